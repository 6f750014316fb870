"""The supervised warm start on the synthetic task's reference solutions (before Stage 1's RLVR)."""

from __future__ import annotations

import logging

import torch

from tempo_mega.backends.torch import TorchBackend
from tempo_mega.batch import RolloutBatch
from tempo_mega.config import TrainConfig
from tempo_mega.data import PromptSampler
from tempo_mega.data.pool import PromptPool
from tempo_mega.data.synthetic import solution_text
from tempo_mega.distributed import is_rank0

log = logging.getLogger("tempo_mega")


# ---------------------------------------------------------------------- warm start
def _token_nll(logprobs: torch.Tensor, mb: RolloutBatch):
    from tempo_mega.algo import masked_mean

    loss = -masked_mean(logprobs, mb.response_mask)
    return loss, {"nll": float(loss.detach())}


_token_nll.agg = "token"


def warm_start(cfg: TrainConfig, actor: TorchBackend, pool: PromptPool) -> dict[str, float]:
    """Supervised warm start on reference solutions of the synthetic task (cross-entropy), so a
    randomly initialised model produces boxed answers at all. Its optimizer state is dropped after.
    Returns ``warmup/*`` metrics (first and last loss, steps)."""
    t = cfg.trainer
    if t.warm_start_steps <= 0:
        return {}
    if cfg.data.uses_files:
        raise ValueError("config key 'trainer.warm_start_steps': the warm start needs reference solutions, "
                         "which only the synthetic task has (data.source=synthetic)")
    tok, src = pool.tokenizer, pool.source()
    eos = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else tok.eos_token_id
    sampler = PromptSampler(pool.train, seed=t.seed + 7)
    nll = []
    # its own bar: a warm start of minutes is not an RL step, and without one the run looked stuck
    bar = None
    if "progress" in t.loggers and is_rank0():
        from tqdm import tqdm

        bar = tqdm(total=t.warm_start_steps, desc="warm start", mininterval=1.0, dynamic_ncols=True)
    with actor.lr_override(t.warm_start_lr):
        for i in range(t.warm_start_steps):
            recs = sampler.next_batch(t.warm_start_batch_size)
            prompts = [pool.ids(r) for r in recs]
            responses = [tok.encode(solution_text(r), add_special_tokens=False) + [eos] for r in recs]
            batch = RolloutBatch.from_samples(prompts, responses, is_labeled=[True] * len(recs),
                                              group_ids=list(range(len(recs))), pad_token_id=src.pad_token_id)
            nll.append(actor.train_step(batch, _token_nll)["actor/nll"])
            if bar is not None:
                bar.set_postfix_str(f"nll={nll[-1]:.4g}", refresh=False)
                bar.update(1)
            if i % 50 == 0 or i == t.warm_start_steps - 1:
                log.info("warm start %d/%d: nll %.4f", i + 1, t.warm_start_steps, nll[-1])
    if bar is not None:
        bar.close()
    actor.reset_optimizer_state()
    return {"warmup/nll_first": nll[0], "warmup/nll_last": nll[-1], "warmup/steps": float(len(nll))}
