"""Everything around the EM loop: build the parts from a config, resume, evaluate, log, checkpoint.

``run_training(cfg)`` is what ``tempo-mega train`` runs. The step itself lives in controller.py.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tempo_mega.algo.advantages import last_valid_index
from tempo_mega.backends.torch import OptimConfig as BackendOptim
from tempo_mega.backends.torch import TorchBackend, build_actor, build_critic
from tempo_mega.batch import RolloutBatch
from tempo_mega.checkpoint import (
    atomic_checkpoint,
    has_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_json,
    prune_checkpoints,
    quarantine_checkpoint,
    recover_interrupted,
    rng_state,
    save_json,
    set_rng_state,
    verify_checkpoint,
)
from tempo_mega.config import TrainConfig, to_dict
from tempo_mega.controller import PromptSource, TempoController
from tempo_mega.data import FIELD_MAPS, FieldMap, PromptRecord, PromptSampler, format_prompt, load_prompts
from tempo_mega.data.synthetic import make_synthetic_task, solution_text
from tempo_mega.data.synthetic_shift import make_shift_task
from tempo_mega.data.tokenizer import build_synthetic_tokenizer, decode_responses
from tempo_mega.distributed import any_rank, barrier, broadcast_object, is_rank0, rank
from tempo_mega.eval.metrics import (
    auroc,
    avg_at_k,
    distinct_answers,
    expected_calibration_error,
    pass_at_k_batch,
    reward_to_prob,
)
from tempo_mega.hostmem import apply_host_memory
from tempo_mega.launch.slurm import REQUEUE_EXIT_CODE  # "checkpointed on a preemption signal: requeue me"
from tempo_mega.models import fresh_qwen3_config, stop_token_ids
from tempo_mega.plan import headline_for_run
from tempo_mega.rewards import empo_rewards, extract_answer, grade_responses, ttrl_rewards
from tempo_mega.rollout.base import RolloutNeedsWeights, weights_device
from tempo_mega.rollout.hf import HFRolloutEngine
from tempo_mega.rollout.samples import broadcast_samples
from tempo_mega.telemetry import JsonlSink, MultiSink, PhaseTimer, ProgressSink, WandbSink
from tempo_mega.telemetry.flops import phase_mfu
from tempo_mega.telemetry.nvml import NvmlSampler, tokens_per_joule

log = logging.getLogger("tempo_mega")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------- data
def load_tokenizer(cfg: TrainConfig):
    from transformers import AutoTokenizer

    path = cfg.model.tokenizer_path or cfg.model.path
    if path is None:
        return build_synthetic_tokenizer()
    if not Path(path).is_dir():
        raise FileNotFoundError(f"config key 'model.tokenizer_path' / 'model.path': no directory {path}")
    return AutoTokenizer.from_pretrained(path)


def load_records(cfg: TrainConfig) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """(labeled train records, unlabeled test records with hidden answers)."""
    d = cfg.data
    if not d.uses_files and d.synthetic_task == "shift":
        return make_shift_task(d.synthetic_num_train, d.synthetic_num_test, seed=d.synthetic_seed)
    if not d.uses_files:
        return make_synthetic_task(d.synthetic_num_train, d.synthetic_num_test, seed=d.synthetic_seed,
                                   difficulty=d.synthetic_difficulty)

    def field_map(name: str) -> FieldMap:
        base = FIELD_MAPS[name]
        return dataclasses.replace(base, prompt=d.prompt_key or base.prompt, answer=d.answer_key or base.answer)

    train = [r for f in d.train_files for r in load_prompts(f, field_map(d.field_map), labeled=True)]
    test_map = field_map(d.test_field_map or d.field_map)
    test = [r for f in d.test_files for r in load_prompts(f, test_map, labeled=False)]
    return train, test


class PromptPool:
    """Token ids of every prompt (computed once), and the two samplers a step draws from."""

    def __init__(self, cfg: TrainConfig, tokenizer, train: list[PromptRecord], test: list[PromptRecord]):
        self.tokenizer, self.train, self.test = tokenizer, train, test
        self._ids: dict[str, list[int]] = {}
        self.max_prompt_tokens = cfg.data.max_prompt_tokens
        seed = cfg.trainer.seed
        self.samplers = {
            "labeled": PromptSampler(train, seed=seed) if train else None,
            "unlabeled": PromptSampler(test, seed=seed + 1) if test else None,
        }

    def ids(self, record: PromptRecord) -> list[int]:
        if record.uid not in self._ids:
            ids = format_prompt(record.prompt, self.tokenizer)
            if len(ids) > self.max_prompt_tokens:
                raise ValueError(f"{record.source}: prompt has {len(ids)} tokens, more than "
                                 f"data.max_prompt_tokens={self.max_prompt_tokens}")
            self._ids[record.uid] = ids
        return self._ids[record.uid]

    def draw(self, kind: str, n: int) -> list[tuple[list[int], str | None]]:
        sampler = self.samplers[kind]
        if sampler is None:
            raise ValueError(f"no {kind} prompts: set data.{'train' if kind == 'labeled' else 'test'}_files "
                             f"or algo.{kind}_prompts_per_step=0")
        return [(self.ids(r), r.answer) for r in sampler.next_batch(n)]

    def source(self) -> PromptSource:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return PromptSource(draw=self.draw, decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
                            pad_token_id=pad, stop_token_ids=stop_token_ids(tok),
                            decode_batch=lambda batch: decode_responses(tok, batch))

    def state_dict(self) -> dict[str, Any]:
        return {k: s.state_dict() for k, s in self.samplers.items() if s is not None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, s in state.items():
            self.samplers[k].load_state_dict(s)


# ---------------------------------------------------------------------- models
def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.trainer.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.trainer.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("config key 'trainer.device': cuda requested but no CUDA device is available")
    return torch.device(cfg.trainer.device)


def kernels_enabled(cfg: TrainConfig, device: torch.device) -> bool:
    """kernels.enable: auto = on where CUDA and Triton are present. Says once which path runs."""
    from tempo_mega.kernels import triton_available

    choice = str(cfg.kernels.enable).lower()
    on = device.type == "cuda" and triton_available() if choice == "auto" else choice == "true"
    if on:
        impl = "Triton" if device.type == "cuda" and triton_available() else "chunked torch (no Triton on this device)"
        # backend=megatron keeps its vocab-parallel log-probs; the value head and the losses are the kernels'
        log.warning("kernels: fused value head and packed GSPO / value losses on (and the fused log-prob on "
                    "backend=torch), %s implementation", impl)
    else:
        log.info("kernels: off (kernels.enable=%s, device %s): plain torch heads and losses", choice, device.type)
    return on


def build_models(cfg: TrainConfig, tokenizer, device: torch.device) -> tuple[TorchBackend, TorchBackend]:
    m, a = cfg.model, cfg.algo
    rows = a.mini_batch_prompts * a.num_samples_per_prompt
    optim = {role: BackendOptim(lr=o.lr, weight_decay=o.weight_decay, grad_clip=o.grad_clip, mini_batch_size=rows,
                                max_tokens_per_micro_batch=o.max_tokens_per_micro_batch, epochs=o.epochs)
             for role, o in (("actor", a.actor), ("critic", a.critic))}
    common = dict(device=device, layout=cfg.trainer.layout, gradient_checkpointing=m.gradient_checkpointing,
                  seed=cfg.trainer.seed, temperature=cfg.rollout.temperature,
                  use_kernels=kernels_enabled(cfg, device))
    if m.path is not None:
        if not Path(m.path).is_dir():
            raise FileNotFoundError(f"config key 'model.path': no directory {m.path}")
        source = m.path
    else:
        torch.manual_seed(cfg.trainer.seed)
        source = fresh_qwen3_config(m, tokenizer)
    if cfg.backend == "megatron":
        return build_megatron_models(cfg, source, optim, use_kernels=common["use_kernels"])
    actor = build_actor(source, optim["actor"], dtype=DTYPES[m.dtype], **common)
    critic_common = {k: v for k, v in common.items() if k != "temperature"}
    if m.critic_path is not None:
        critic = build_critic(m.critic_path, optim["critic"], dtype=DTYPES[m.dtype], **critic_common)
    else:
        critic = build_critic(actor, optim["critic"], **critic_common)
    return actor, critic


def build_megatron_models(cfg: TrainConfig, source, optim: dict[str, BackendOptim], use_kernels: bool = False):
    """backend=megatron: actor and critic as ``MegatronBackend``s, started from the same HF weights the
    torch backend would use (``source``: a checkpoint dir, whose tensors each rank reads on demand for its
    own stage, or a fresh Qwen3 config, built from trainer.seed). torch.distributed and megatron's
    parallel state come up through the backend's own ``init_parallel`` where they are not up yet (world
    size from the torchrun environment, else 1; gloo on CPU, nccl on CUDA)."""
    import torch.distributed as dist

    from tempo_mega.backends.megatron.backend import MegatronBackend
    from tempo_mega.backends.megatron.model import init_parallel
    from tempo_mega.backends.torch import ValueHeadModel, _load_causal_lm
    from tempo_mega.config import megatron_config

    m, seed = cfg.model, cfg.trainer.seed
    mc = megatron_config(cfg)
    if isinstance(source, (str, Path)):
        # a checkpoint: each rank reads the tensors of its own stage from the safetensors files, on demand
        from transformers import AutoConfig

        from tempo_mega.backends.megatron.hf_weights import SafetensorsWeights, critic_weights

        hf_config = AutoConfig.from_pretrained(source)
        actor_sd = SafetensorsWeights(source, dtype=DTYPES[m.dtype])
        critic_sd = critic_weights(actor_sd, m.critic_path, hidden_size=hf_config.hidden_size, seed=seed,
                                   dtype=DTYPES[m.dtype])
    else:
        # a fresh config: the HF models exactly as the torch backend builds them (same init, same RNG use)
        hf_actor = _load_causal_lm(source, DTYPES[m.dtype], "sdpa", seed)
        if m.critic_path is not None:
            hf_critic = ValueHeadModel.from_pretrained(m.critic_path, dtype=DTYPES[m.dtype], seed=seed)
        else:
            hf_critic = ValueHeadModel.from_actor(hf_actor, seed=seed)
        hf_config, actor_sd, critic_sd = hf_actor.config, hf_actor.state_dict(), hf_critic.state_dict()
    init_parallel(mc, seed=seed)
    try:
        mc.validate_for(num_attention_heads=hf_config.num_attention_heads,
                        num_key_value_heads=hf_config.num_key_value_heads,
                        num_layers=hf_config.num_hidden_layers, vocab_size=hf_config.vocab_size,
                        world_size=dist.get_world_size())
    except ValueError as e:
        raise ValueError(f"config key 'megatron': {e}") from None
    # no trainer.layout here: MegatronBackend packs every micro-batch (padded and packed give the same numbers)
    # use_kernels on both roles: the controller routes the GSPO and value losses through the packed kernels
    # by it (the actor's log-probs stay megatron's vocab-parallel ones, which no kernel here replaces)
    actor = MegatronBackend("actor", hf_config, mc, optim["actor"], hf_state_dict=actor_sd,
                            temperature=cfg.rollout.temperature, seed=seed, use_kernels=use_kernels)
    critic = MegatronBackend("critic", hf_config, mc, optim["critic"], hf_state_dict=critic_sd,
                             seed=seed, use_kernels=use_kernels)
    log.info("backend=megatron: TP %d, PP %d (virtual %s), DP %d, params %s, distributed optimizer %s",
             actor.tp_size, actor.pp_size, mc.vpp or 1, actor.dp_size, mc.params_dtype, mc.use_distributed_optimizer)
    return actor, critic


def copy_actor_trunk_to_critic(actor, critic) -> None:
    """The critic's trunk := the actor's (after the warm start); its value head is kept."""
    if isinstance(actor, TorchBackend):
        critic.model.model.load_state_dict(actor.model.model.state_dict())
    else:  # MegatronBackend: through HF names (a collective)
        critic.load_hf_state_dict({n: t for n, t in actor.export_weights(dtype=None) if n.startswith("model.")})


def push_weights(actor, rollout) -> None:
    """The actor's weights into the rollout engine, exported where the engine takes them."""
    rollout.update_weights(actor.export_weights(device=weights_device(rollout)))


def build_rollout(cfg: TrainConfig, actor: TorchBackend, pad_token_id: int, device: torch.device):
    """The sampler: the HF engine (a copy of the actor) or SGLang (rollout.sglang.*), which is given
    the trainer's log-probs for its post-sync probe and the actor's weights to re-sync a restarted server.
    backend=megatron wraps either in ``RankZeroRollout`` (rank 0 samples for every rank; every rank takes
    part in the collective weight export, and in the probe forward for SGLang)."""
    if cfg.rollout.engine == "hf":
        if isinstance(actor, TorchBackend):
            return HFRolloutEngine(copy.deepcopy(actor.model), pad_token_id=pad_token_id, device=device,
                                   max_batch_size=cfg.rollout.max_batch_size)
        # backend=megatron: an HF model from the actor's HF-named weights (hf_module is a collective),
        # held and sampled from by rank 0 alone
        model = actor.hf_module(rank0_only=True)
        return RankZeroRollout(lambda _: HFRolloutEngine(model, pad_token_id=pad_token_id, device=device,
                                                         max_batch_size=cfg.rollout.max_batch_size),
                               actor, pad_token_id=pad_token_id, weights_device=device)
    from tempo_mega.rollout.sglang import SGLangConfig, build_sglang_engine, sync_device

    try:
        sg = SGLangConfig(**cfg.rollout.sglang)
    except TypeError as e:
        raise ValueError(f"config key 'rollout.sglang': {e}") from None
    # server logs under the run's output dir; the response budget checked against the servers' context
    where = {"log_dir": Path(cfg.trainer.output_dir) / "sglang_logs",
             "max_response_tokens": cfg.rollout.max_response_tokens}
    if isinstance(actor, TorchBackend):
        engine = build_sglang_engine(sg, pad_token_id=pad_token_id,
                                     trainer_logprob_fn=lambda ids: probe_logprobs(actor, ids, pad_token_id),
                                     weights_source=lambda: actor.export_weights(device=sync_device(sg)), **where)
    else:
        engine = RankZeroSGLang(sg, actor, pad_token_id=pad_token_id, weights_dtype=DTYPES[cfg.model.dtype],
                                **where)
    push_weights(actor, engine)  # the servers start from the trainer's weights
    return engine


@contextlib.contextmanager
def _at_temperature(actor, temperature: float) -> Iterator[None]:
    saved = actor.temperature
    actor.temperature = temperature
    try:
        yield
    finally:
        actor.temperature = saved


def probe_logprobs(actor, ids: list[int], pad_token_id: int) -> list[float]:
    """[len(ids) - 1] log-probs of ``ids[1:]``, each after its prefix, under the actor's current weights
    at temperature 1, through the backend seam: ``forward_logprobs`` on a one-row batch (prompt
    ``ids[:1]``, response ``ids[1:]``); a collective on a multi-rank MegatronBackend.

    Temperature 1 because that is what the probe compares against: ``SGLangRolloutEngine.probe`` asks
    each server for the ``input_token_logprobs`` of ``ids`` in a request sent with temperature 1.0 (the
    fake server computes them at temperature 1 whatever the request says). ``forward_logprobs`` divides
    the logits by the temperature the backend was built with (rollout.temperature), and log-probs at
    temperature T cannot be rescaled to temperature 1 from the chosen tokens alone (the normaliser
    changes), so this one forward runs with the backend's temperature set to 1."""
    batch = RolloutBatch.from_samples([ids[:1]], [ids[1:]], is_labeled=[False], group_ids=[0],
                                      pad_token_id=pad_token_id)
    with _at_temperature(actor, 1.0):
        return actor.forward_logprobs(batch)[0, : len(ids) - 1].tolist()


class RankZeroRollout:
    """A rollout engine for backend=megatron, as every rank of the run sees it (a RolloutEngine): one
    engine, on rank 0, samples for the whole run.

    ``build(self)`` makes the engine; it runs on rank 0 alone (it may use ``self._trainer_logprobs`` as the
    engine's probe). Every rank
    - iterates each weight stream it is given to its end: ``MegatronBackend.export_weights`` is a
      collective (TP shards are gathered, PP stages broadcast over the pipeline); rank 0 drains the
      rest of the stream after a failed push too, so that no rank is left waiting in a collective;
    - with ``probe_ids``, computes the probe's trainer log-probs (``probe_logprobs``, a collective
      forward) before each push, which rank 0's engine compares its own against;
    - gets rank 0's samples, metrics and outcome by broadcast (``broadcast_object_list``), so all ranks
      train on the same batch and an error on rank 0 raises on every rank.

    ``weights_dtype``: the engine gets the tensors in this dtype (cast here where megatron.params_dtype
    differs); None passes them as exported.

    The samples travel from rank 0 as flat tensors (``rollout.samples.broadcast_samples``: 33.5M tokens
    at the paper's shape are 270 MB, with no Python work per token), and the process group's timeout
    must cover rank 0's longest generate. In a one-process world it is the engine (plus the
    probe and the cast)."""

    def __init__(self, build, actor, *, pad_token_id: int, weights_dtype: torch.dtype | None = None,
                 probe_ids: list[int] | None = None, max_resyncs: int = 2,
                 weights_device: str | torch.device = "cpu", release_during_training: bool = False):
        import torch.distributed as dist

        up = dist.is_available() and dist.is_initialized()
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if up else (0, 1)
        self.actor, self.pad_token_id, self.weights_dtype = actor, pad_token_id, weights_dtype
        self.probe_ids = list(probe_ids) if probe_ids is not None else None
        self.max_resyncs = max_resyncs
        self.weights_device = weights_device  # the same on every rank: each one exports there
        self._release_during_training = release_during_training  # the same on every rank too
        self.last_metrics: dict[str, float] = {}
        self._want: list[float] | None = None
        self._samples: list | None = None
        self.engine = None
        self._on_rank0(lambda: setattr(self, "engine", build(self)))

    def _trainer_logprobs(self, ids: list[int]) -> list[float]:
        """What ``probe_logprobs`` gave on every rank before this push (rank 0 alone cannot run it)."""
        if self._want is None or list(ids) != self.probe_ids:
            raise RuntimeError("RankZeroRollout: the probe asked for log-probs that were not computed before the push")
        return self._want

    def _cast(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        want = self.weights_dtype
        for name, t in named_tensors:
            yield name, (t.to(want) if want is not None and t.is_floating_point() and t.dtype != want else t)

    def _on_rank0(self, fn):
        """``fn()`` on rank 0; its result, rank 0's metrics and its error (if any) on every rank."""
        import torch.distributed as dist

        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except Exception as e:  # the other ranks must hear of it, or they wait in the next collective
                error = e
            if self.engine is not None:
                self.last_metrics = dict(getattr(self.engine, "last_metrics", {}))
        if self.world_size > 1:
            box = [(result, None if error is None else f"{type(error).__name__}: {error}", self.last_metrics)]
            dist.broadcast_object_list(box, src=0)
            result, message, self.last_metrics = box[0]
            if message is not None and error is None:
                raise RuntimeError(f"rollout failed on rank 0: {message}")
        if error is not None:
            raise error
        return result

    def generate(self, prompt_ids, n: int, sampling) -> list:
        """Rank 0's samples on every rank. When rank 0's engine lost the weights (a restarted server that
        it cannot re-sync alone: ``RolloutNeedsWeights``), every rank takes part in exporting them again,
        rank 0 pushes them to what was restarted, and the whole call is generated again (at most
        ``max_resyncs`` times)."""
        def attempt():
            try:
                self._samples = self.engine.generate(prompt_ids, n, sampling)
                return "samples", None  # the samples travel as flat tensors, below
            except RolloutNeedsWeights as e:
                return "needs_weights", str(e)

        resynced: dict[str, float] = {}
        for k in range(self.max_resyncs + 1):
            kind, value = self._on_rank0(attempt)
            if kind == "samples":
                samples, self._samples = broadcast_samples(self._samples if self.rank == 0 else None), None
                self.last_metrics.update(resynced)  # the generate's own metrics replaced the re-sync's
                return samples
            log.warning("rollout: %s; re-sending the weights", value)
            self._push_weights(self.actor.export_weights(device=self.weights_device), "resync_stale")
            keep = ("rollout/probe_logprob_diff_max", "timing/weight_resync_s")
            resynced = {key: self.last_metrics[key] for key in keep if key in self.last_metrics}
            resynced["rollout/weight_resyncs"] = float(k + 1)
        raise RuntimeError(f"rollout: the engine lost its weights again after {self.max_resyncs} re-syncs: {value}")

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self.probe_ids is not None:
            self._want = probe_logprobs(self.actor, self.probe_ids, self.pad_token_id)
        self._push_weights(named_tensors, "update_weights")

    def _push_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], method: str) -> None:
        """Rank 0's ``engine.<method>(stream)``, every rank iterating the stream to its end."""
        stream = self._cast(named_tensors)

        def push() -> None:
            try:
                getattr(self.engine, method)(stream)
                if method == "resync_stale" and self.probe_ids is not None:
                    self.engine.last_metrics["rollout/probe_logprob_diff_max"] = self.engine.probe()
            finally:
                for _ in stream:  # the export is a collective: finish it whatever the push did
                    pass

        if self.rank != 0:
            for _ in stream:
                pass
        self._on_rank0(push)

    @property
    def release_during_training(self) -> bool:
        return self._release_during_training

    def release_memory(self, tags=None) -> None:
        # tags only where given: the HF engine's methods take none; an error reaches every rank
        self._on_rank0(lambda: self.engine.release_memory(*([] if tags is None else [tags])))

    def resume_memory(self, tags=None) -> None:
        self._on_rank0(lambda: self.engine.resume_memory(*([] if tags is None else [tags])))

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()


class RankZeroSGLang(RankZeroRollout):
    """SGLang for backend=megatron: rank 0 drives the servers (launch, generate, weight push, probe).

    SGLang gets the tensors in ``weights_dtype`` (model.dtype: what the torch backend exports, bf16 in
    the Qwen3 presets). The process group's timeout must also cover rank 0's server launch. With world
    size > 1 and tensor sync, a restarted server is re-synced by every rank exporting the weights again
    (``RankZeroRollout.generate``); disk sync re-syncs from its last copy; distributed (NCCL) sync cannot
    take a restarted server back into its weight group, which is an error."""

    def __init__(self, cfg, actor, *, pad_token_id: int, weights_dtype: torch.dtype, **engine_kw):
        from tempo_mega.rollout.sglang import build_sglang_engine, sync_device

        def build(me: RankZeroRollout):
            source = (lambda: me._cast(actor.export_weights(device=me.weights_device))) if me.world_size == 1 else None
            return build_sglang_engine(cfg, pad_token_id=pad_token_id, weights_source=source,
                                       trainer_logprob_fn=me._trainer_logprobs if cfg.probe else None, **engine_kw)

        super().__init__(build, actor, pad_token_id=pad_token_id, weights_dtype=weights_dtype,
                         probe_ids=list(cfg.probe_ids) if cfg.probe else None, max_resyncs=cfg.max_retries,
                         weights_device=sync_device(cfg), release_during_training=cfg.release_during_training)


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


# ---------------------------------------------------------------------- evaluation
def trap_metrics(records: list[PromptRecord], answers: list[list[str | None]], correct: torch.Tensor) -> dict[str, float]:
    """On prompts that have a known tempting wrong answer (the synthetic task's carry/borrow families):
    their accuracy and how often the model gives exactly that wrong answer. A self-consistency reward
    that locks onto the trap shows up as a rising ``eval/trap_answer_frac``."""
    rows = [i for i, r in enumerate(records) if r.meta.get("trap_answer") is not None]
    if not rows:
        return {}
    hits = [a == records[i].meta["trap_answer"] for i in rows for a in answers[i]]

    def majority(xs: list[str | None]) -> str | None:  # most common given answer; ties -> first seen
        given = [x for x in xs if x is not None]
        return max(given, key=given.count) if given else None

    # the share of trap prompts whose majority answer (what TTRL rewards) IS the trap answer
    locked = [majority(answers[i]) == records[i].meta["trap_answer"] for i in rows]
    return {"eval/trap_family_avg@k": float(correct[rows].float().mean()),
            "eval/trap_answer_frac": sum(hits) / len(hits),
            "eval/trap_majority_frac": sum(locked) / len(locked)}


def evaluate(ctrl: TempoController, pool: PromptPool, cfg: TrainConfig, seed: int) -> dict[str, float]:
    """Hidden-answer accuracy on the unlabeled split and the reward-drift monitor: how well the reward
    the current mode trains on separates truly correct from wrong responses (AUROC, calibration)."""
    t, a = cfg.trainer, cfg.algo
    records = pool.test[: t.eval_max_prompts]
    if not records:
        return {}
    k = t.eval_num_samples
    prompts = [(pool.ids(r), None) for r in records]
    batch = ctrl.generate(prompts, labeled=False, seed=seed, first_group=0, n=k, temperature=t.eval_temperature)
    texts = batch.meta["text"]
    gold = [records[i // k].eval_answer for i in range(len(texts))]
    graded = [i for i, g in enumerate(gold) if g is not None]
    verdicts = grade_responses([texts[i] for i in graded], [gold[i] for i in graded], lenient=a.lenient_grading,
                               workers=ctrl.grading_workers)
    correct = [False] * len(texts)
    for i, v in zip(graded, verdicts):
        correct[i] = v
    correct = broadcast_object(correct)  # rank 0's verdicts on every rank (as the controller's)
    table = torch.tensor(correct).view(len(records), k)
    answers = [[extract_answer(texts[p * k + j]) for j in range(k)] for p in range(len(records))]
    m = {"eval/avg@k": avg_at_k(table), "eval/pass@1": pass_at_k_batch(table, 1),
         f"eval/pass@{k}": pass_at_k_batch(table, k), "eval/k": float(k),
         "eval/distinct_answers": distinct_answers(answers),
         "eval/response_len_mean": float(batch.response_lengths().float().mean()),
         "eval/truncated_frac": sum(batch.meta["truncated"]) / len(texts),
         "eval/grading_lenient": float(a.lenient_grading)}
    m.update(trap_metrics(records, answers, table))
    values = ctrl.critic.forward_values(batch)

    critic_reward = values.gather(1, last_valid_index(batch.response_mask)[:, None]).squeeze(1).tolist()
    rewards = {"critic": critic_reward}
    for name, fn in (("ttrl", ttrl_rewards), ("empo", empo_rewards)):
        rewards[name] = [r for p in range(len(records)) for r in fn(texts[p * k:(p + 1) * k])[0]]
    for name, r in rewards.items():
        m[f"eval/{name}_reward_auroc"] = auroc(r, correct)
        low, high = (0.0, 1.0) if name == "empo" else (a.score_negative, a.score_positive)
        m[f"eval/{name}_reward_ece"] = expected_calibration_error(reward_to_prob(r, low, high), correct)
    own = {"ttrl": "ttrl", "empo": "empo"}.get(a.mode, "critic")
    m["eval/reward_auroc"] = m[f"eval/{own}_reward_auroc"]
    m["eval/reward_ece"] = m[f"eval/{own}_reward_ece"]
    return m


# ---------------------------------------------------------------------- the run
@dataclass
class Run:
    cfg: TrainConfig
    out: Path
    pool: PromptPool
    actor: TorchBackend
    critic: TorchBackend
    rollout: HFRolloutEngine
    ctrl: TempoController
    sink: Any
    start_step: int
    first_line: dict[str, float] | None = None  # metrics that ride on the first step's line


# What a run writes into trainer.output_dir: a folder holding any of these holds a run. Other files (the
# SLURM launcher's tempo.sbatch and logs/, a user's notes) are not the trainer's and are never removed.
RUN_FILES = ("checkpoints", "metrics.jsonl", "config.json", "hf", "profile", "wandb")


def _launch_rank() -> int:
    """This process's rank, also before the process group is up (torchrun's RANK)."""
    import os

    import torch.distributed as dist

    return rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))


def prepare_output_dir(cfg: TrainConfig) -> None:
    """Rank 0, before anything is built: check that trainer.resume / trainer.overwrite agree with what
    trainer.output_dir holds, and remove the old run for trainer.overwrite=true. Raises ValueError naming
    the folder and the ways out."""
    import shutil

    t = cfg.trainer
    out = Path(t.output_dir)
    held = [name for name in RUN_FILES if (out / name).exists()]
    if t.overwrite:
        for name in held:
            path = out / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        if held:
            print(f"trainer.overwrite=true: removed the earlier run in {out} ({', '.join(held)})")
        return
    resumable = has_checkpoint(out / "checkpoints")
    if t.resume == "true" and not resumable:
        raise ValueError(f"config key 'trainer.resume': trainer.resume=true, but {out / 'checkpoints'} holds no "
                         "complete checkpoint to resume from; start a run there with trainer.resume=auto (or false)")
    if t.resume == "false" and held:
        raise ValueError(f"config key 'trainer.resume': {out} already holds a run ({', '.join(held)}), and "
                         f"trainer.resume=false starts a new one: continue it with trainer.resume=true, give the new "
                         "run its own trainer.output_dir, or replace the old one with trainer.overwrite=true")
    if t.resume == "auto" and held and not resumable:
        log.warning("trainer.resume=auto: %s holds no complete checkpoint (%s of an attempt that never "
                    "checkpointed): starting fresh", out, ", ".join(held))


def find_resume_checkpoint(root: Path) -> Path | None:
    """The checkpoint to resume from, the same on every rank: rank 0 first finishes or removes what a
    crashed save left under ``root`` (``checkpoint.recover_interrupted``), then takes the newest complete
    checkpoint whose files match the checksums in its marker. One that does not is moved aside
    (``checkpoint.quarantine_checkpoint``) with a warning naming the bad file, and the one before it is
    tried; when every one fails, every rank raises ValueError naming the bad file."""
    ckpt, error = None, None
    if is_rank0():
        for action in recover_interrupted(root):
            log.warning("checkpoint recovery in %s: %s", root, action)
        bad = []
        for _, path in reversed(list_checkpoints(root)):
            problem = verify_checkpoint(path)
            if problem is None:
                ckpt = path
                break
            moved = quarantine_checkpoint(path)
            bad.append(problem)
            log.warning("checkpoint %s is corrupt: %s; moved to %s, trying the one before", path.name, problem, moved.name)
        if ckpt is None and bad:
            error = (f"no usable checkpoint in {root}: {'; '.join(bad)} (moved aside as corrupt-*); start fresh "
                     "with trainer.overwrite=true or restore the file")
    ckpt, error = broadcast_object((ckpt, error))
    if error is not None:
        raise ValueError(error)
    return ckpt


def setup(cfg: TrainConfig) -> Run:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t = cfg.trainer
    out = Path(t.output_dir)
    if _launch_rank() == 0:
        prepare_output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(t.seed)
    apply_host_memory(t.host_memory)  # before the first step's buffers
    device = resolve_device(cfg)
    tokenizer = load_tokenizer(cfg)
    train, test = load_records(cfg)
    pool = PromptPool(cfg, tokenizer, train, test)
    log.info("%s", headline_for_run(cfg, vocab_size=len(tokenizer)))  # `tempo-mega plan` of this run: memory per GPU, step time
    actor, critic = build_models(cfg, tokenizer, device)  # starts the process group of a megatron run
    src = pool.source()
    rollout = build_rollout(cfg, actor, src.pad_token_id, device)
    # trainer.resume=false, or overwrite: prepare_output_dir made sure there is nothing to resume
    ckpt = find_resume_checkpoint(out / "checkpoints") if t.resume != "false" and not t.overwrite else None
    # checkpoints and metric lines count completed steps: step_00000003 holds the weights after 3 steps
    done_steps = int(load_json(ckpt / "state.json")["completed_steps"]) if ckpt is not None else 0
    sinks = []
    if not is_rank0():  # rank 0 alone writes the run's files; every rank computes the same metrics
        t = dataclasses.replace(t, loggers=[])
    if "jsonl" in t.loggers:
        sinks.append(JsonlSink(out / "metrics.jsonl", truncate_after_step=done_steps))
    if "progress" in t.loggers:
        sinks.append(ProgressSink(t.total_steps, initial_step=done_steps, desc=f"{out.name} step"))
    if "wandb" in t.loggers:
        # a resumed run continues the wandb run of its checkpoint rather than starting a new one
        wandb_id = load_json(ckpt / "state.json").get("wandb_run_id") if ckpt is not None else None
        sinks.append(WandbSink(t.wandb_project, out.name, to_dict(cfg), out, mode=t.wandb_mode, resume_id=wandb_id))
    sink = MultiSink(sinks)
    if is_rank0():
        save_json(out / "config.json", to_dict(cfg))
    ctrl = TempoController(cfg, actor, critic, rollout, src, PhaseTimer())
    run = Run(cfg, out, pool, actor, critic, rollout, ctrl, sink, start_step=0)
    if ckpt is not None:
        actor.load(ckpt / "actor")
        critic.load(ckpt / "critic")
        # weights_only: a run folder may be shared or downloaded, and a full unpickle can run code. These
        # files hold tensors, numbers, strings and lists/dicts/tuples only (checkpoint.rng_state).
        state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
        pool.load_state_dict(state["samplers"])
        own_rng = ckpt / f"rng_rank{rank()}.pt"
        set_rng_state(torch.load(own_rng, weights_only=True) if rank() > 0 and own_rng.is_file() else state["rng"])
        push_weights(actor, rollout)
        run.start_step = done_steps
        if is_rank0():
            left = "" if done_steps < t.total_steps else f"; trainer.total_steps={t.total_steps} already reached"
            print(f"resumed from step {done_steps} ({ckpt}){left}")
    else:
        run.first_line = warm_start(cfg, actor, pool)
        if t.warm_start_steps > 0:  # the critic starts from the warmed-up actor, as Stage 1 prescribes
            copy_actor_trunk_to_critic(actor, critic)
            push_weights(actor, rollout)
    return run


def save_checkpoint(run: Run, completed_steps: int) -> Path:
    root = run.out / "checkpoints"
    with atomic_checkpoint(root, completed_steps) as d:  # a collective in a multi-process run
        run.actor.save(d / "actor")
        run.critic.save(d / "critic")
        if is_rank0():
            torch.save({"samplers": run.pool.state_dict(), "rng": rng_state()}, d / "trainer_state.pt")
            state: dict[str, Any] = {"completed_steps": completed_steps}
            wandb_sinks = [x for x in getattr(run.sink, "sinks", []) if isinstance(x, WandbSink)]
            if wandb_sinks:
                state["wandb_run_id"] = wandb_sinks[0].run_id
            save_json(d / "state.json", state)
            save_json(d / "config.json", to_dict(run.cfg))
        else:
            torch.save(rng_state(), d / f"rng_rank{rank()}.pt")
    if is_rank0():
        prune_checkpoints(root, run.cfg.trainer.keep_last)
    barrier()
    return root


def export_hf(run: Run, directory: Path) -> None:
    """An HF-loadable actor (with tokenizer) and the critic beside it, for the next stage."""
    run.actor.export_hf(directory / "actor")  # collectives for the Megatron backend; rank 0 writes
    if is_rank0():
        run.pool.tokenizer.save_pretrained(directory / "actor")
    run.critic.export_hf(directory / "critic")




class Preempted(SystemExit):
    """Raised after the checkpoint that follows SIGTERM/SIGUSR1; exits with REQUEUE_EXIT_CODE."""

    def __init__(self, completed_steps: int):
        super().__init__(REQUEUE_EXIT_CODE)
        self.completed_steps = completed_steps


class PreemptionWatch:
    """Remembers SIGTERM / SIGUSR1 (SLURM's warning before the time limit) instead of dying mid-step:
    the loop finishes the step, checkpoints and exits with REQUEUE_EXIT_CODE.

    That wait is bounded: a second SIGTERM / SIGUSR1 / SIGINT, or ``grace_s`` (trainer.preempt_grace_s)
    after the first signal, ends the process at once with exit code 128 + the signal's number and a
    message naming the last complete checkpoint under ``checkpoints``: a step or a save that never ends
    (a hung collective, a stuck write) cannot keep a run from stopping. A checkpoint is published only
    once complete (checkpoint.atomic_checkpoint), so ending mid-save leaves the previous one intact; the
    partial directory is cleaned up by the next resume. A first SIGINT keeps Python's KeyboardInterrupt
    (and starts the grace period).

    The signals are counted by a watcher thread woken through ``signal.set_wakeup_fd``, which the
    interpreter writes to the moment a signal arrives, whatever the main thread is blocked in (Python's
    handlers wait for the main thread to run bytecode again, which a hung collective never does)."""

    SIGNALS = ("SIGTERM", "SIGUSR1")
    ESCALATE = ("SIGTERM", "SIGUSR1", "SIGINT")  # a second one of these ends the process
    # one request often arrives twice: SLURM signals every process of the step and the batch script's trap
    # forwards the same signal through srun and torchrun; signals this soon after the first are that one
    REPEAT_WINDOW_S = 2.0
    EXIT_HANDLERS_TIMEOUT_S = 10.0  # atexit handlers (stopping launched servers) get this long, then we exit

    def __init__(self, grace_s: float | None = None, checkpoints: Path | None = None):
        if grace_s is not None and not grace_s > 0:
            raise ValueError(f"config key 'trainer.preempt_grace_s': must be > 0 seconds, got {grace_s}")
        self.grace_s, self.checkpoints = grace_s, checkpoints
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}
        self._previous_wakeup_fd: int | None = None
        self._socks: tuple[Any, Any] | None = None
        self._first_at: float | None = None  # when the watcher saw the first signal (monotonic)
        self._first_signal = 0
        self._stopped = False
        self._watcher: threading.Thread | None = None

    def __enter__(self) -> PreemptionWatch:
        import signal
        import socket

        if threading.current_thread() is not threading.main_thread():  # handlers only install there
            return self
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)
        reader, writer = socket.socketpair()
        writer.setblocking(False)  # the interpreter's C-level signal handler must never block
        self._socks = (reader, writer)
        self._previous_wakeup_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        self._watcher = threading.Thread(target=self._watch, args=(reader,), name="preemption-watch", daemon=True)
        self._watcher.start()
        return self

    def _handle(self, signum, frame) -> None:
        import signal

        if self.signal is None:
            log.warning("received signal %d: checkpointing after the current step, then exiting for requeue "
                        "(a second signal%s ends the run at once)", signum,
                        f", or {self.grace_s:g} s without finishing," if self.grace_s else "")
            self.signal = signum
            if signal.SIGINT not in self._previous:  # from now on SIGINT is the watcher's, not a KeyboardInterrupt
                self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, lambda *_: None)

    def _watch(self, reader) -> None:
        """Watcher thread: reads the signal numbers the interpreter writes to the wakeup fd."""
        import select
        import signal
        import time

        escalate = {getattr(signal, n) for n in self.ESCALATE if hasattr(signal, n)}
        while not self._stopped:
            timeout = None
            if self._first_at is not None and self.grace_s is not None:
                timeout = max(0.0, self._first_at + self.grace_s - time.monotonic())
            try:
                ready, _, _ = select.select([reader], [], [], timeout)
            except (OSError, ValueError):  # closed at exit
                return
            if not ready:  # the grace period ran out
                self._force_exit(self._first_signal, f"trainer.preempt_grace_s={self.grace_s:g} s passed since "
                                                      f"signal {self._first_signal} without a checkpoint and exit")
                return
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data or self._stopped:
                return
            now = time.monotonic()
            for signum in data:
                if signum not in escalate:
                    continue
                if self._first_at is None:
                    self._first_at, self._first_signal = now, signum
                elif now - self._first_at >= self.REPEAT_WINDOW_S:
                    self._force_exit(signum, f"a second signal ({signum}, after {self._first_signal})")
                    return

    def _force_exit(self, signum: int, why: str) -> None:
        import atexit
        import os
        import sys

        code = 128 + int(signum)
        last = None
        if self.checkpoints is not None:
            with contextlib.suppress(Exception):
                last = latest_checkpoint(self.checkpoints)
        where = f"the last complete checkpoint is {last}" if last is not None else \
            f"no complete checkpoint under {self.checkpoints}" if self.checkpoints is not None else "no checkpoint dir"
        message = (f"tempo-mega: ending the run now: {why}; the step in flight is lost, {where}; "
                   f"exit code {code}")
        log.error(message)
        with contextlib.suppress(Exception):
            print(message, file=sys.stderr, flush=True)
        # atexit handlers stop what the run launched (e.g. SGLang servers), but may hang themselves
        handlers = threading.Thread(target=atexit._run_exitfuncs, daemon=True)
        handlers.start()
        handlers.join(self.EXIT_HANDLERS_TIMEOUT_S)
        os._exit(code)

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._socks is not None:
            with contextlib.suppress(ValueError):
                signal.set_wakeup_fd(self._previous_wakeup_fd if self._previous_wakeup_fd is not None else -1)
            self._stopped = True
            with contextlib.suppress(OSError):
                self._socks[1].send(b"\0")  # wakes the watcher, which sees _stopped and returns
            if self._watcher is not None:
                self._watcher.join(1.0)
            for sock in self._socks:
                sock.close()
            self._socks = None


def profile_step(cfg: TrainConfig, out: Path, step: int):
    """A torch profiler around the steps listed in profile.steps (a Chrome trace per step; NVTX ranges
    around the phases come from PhaseTimer, for nsys)."""
    import contextlib

    if step not in cfg.profile.steps:
        return contextlib.nullcontext()
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    trace_dir = Path(cfg.profile.dir) if cfg.profile.dir else out / "profile"
    trace_dir.mkdir(parents=True, exist_ok=True)

    def export(prof) -> None:
        prof.export_chrome_trace(str(trace_dir / f"step_{step:06d}.json"))

    @contextlib.contextmanager
    def ctx():
        with profile(activities=activities, record_shapes=False, with_stack=False) as prof:
            yield
        export(prof)

    return ctx()


def trainer_num_gpus(run: Run) -> int:
    """The devices a step's phases ran on, which MFU and per-GPU throughput divide by: every rank of a
    backend=megatron world (one device per rank; actor and critic share megatron's one parallel state,
    and the rollout runs on those devices too, colocated or from rank 0 while the others wait), 1 for
    the torch backend (one process, one device). The step's token count is the whole batch's, which
    every megatron rank is given."""
    import torch.distributed as dist

    if run.cfg.backend == "megatron" and dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _energy_of_all_ranks(run: Run, m: dict[str, float]) -> float | None:
    """``gpu/energy_j`` summed over the ranks (each samples its own GPU), or None unless every rank
    measured it. A collective in a multi-rank world: every rank calls it at the same point."""
    import torch.distributed as dist

    measured = "gpu/energy_j" in m
    if trainer_num_gpus(run) == 1:
        return float(m["gpu/energy_j"]) if measured else None
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([float(m["gpu/energy_j"]) if measured else 0.0, float(measured)], dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return float(t[0]) if int(t[1]) == dist.get_world_size() else None


def throughput_metrics(run: Run, m: dict[str, float], *, on_gpu: bool | None = None) -> dict[str, float]:
    """Tokens per joule where NVML measured the energy of every rank's GPU (the step's tokens over all
    of it); MFU per phase and tokens/s per GPU over ``trainer_num_gpus`` where the step ran on GPUs
    (``on_gpu`` None: the actor's device is CUDA; the CPU has no peak to compare with, so tests pass
    True to check the arithmetic there)."""
    out = {}
    energy_j = _energy_of_all_ranks(run, m)
    if energy_j is not None and "perf/num_tokens" in m:
        out["perf/tokens_per_joule"] = tokens_per_joule(m["perf/num_tokens"], energy_j)
    if on_gpu is None:
        on_gpu = run.actor.device.type == "cuda"
    if on_gpu and "timing/step_s" in m:
        a = run.cfg.algo
        # MegatronBackend keeps the HF config beside its megatron model
        actor_cfg = getattr(run.actor, "hf_config", None) or run.actor.model.config
        critic_cfg = getattr(run.critic, "hf_config", None) or run.critic.model.config
        out.update(phase_mfu(m, actor_cfg, critic_cfg, trainer_num_gpus(run), run.cfg.trainer.gpu_peak,
                             actor_epochs=a.actor.epochs, critic_epochs=a.critic.epochs,
                             critic_labeled_only=a.mode in ("tempo", "supervised_continuation")))
    return out


def run_training(cfg: TrainConfig) -> Run:
    run = setup(cfg)
    t = cfg.trainer
    eval_seed = t.seed * 7919 + 1
    initial = dict(run.first_line or {})
    if run.start_step == 0 and t.total_steps > 0:
        # "before" numbers ride on the first step's line, so every line of metrics.jsonl is a step
        initial.update({k.replace("eval/", "eval_initial/", 1): v
                        for k, v in evaluate(run.ctrl, run.pool, cfg, eval_seed).items()})
    for sink in getattr(run.sink, "sinks", []):  # the step bar's clock starts with the first step
        if isinstance(sink, ProgressSink):
            sink.restart_clock()
    gpu = NvmlSampler().start()  # says once and logs nothing where there is no GPU
    with PreemptionWatch(t.preempt_grace_s, run.out / "checkpoints") as watch, gpu:
        for step in range(run.start_step, t.total_steps):
            with profile_step(cfg, run.out, step):
                metrics = run.ctrl.step(step)
            # SGLang's post-sync probe of this step's weight push (the next generate clears it)
            probe = getattr(run.rollout, "last_metrics", {}).get("rollout/probe_logprob_diff_max")
            if probe is not None:
                metrics["rollout/probe_logprob_diff_max"] = probe
            metrics.update(gpu.step_metrics())
            metrics.update(throughput_metrics(run, metrics))
            metrics.update(initial)
            initial = {}
            last = step == t.total_steps - 1
            if (t.eval_every and (step + 1) % t.eval_every == 0) or last:
                metrics.update(evaluate(run.ctrl, run.pool, cfg, eval_seed))
            run.sink.log(metrics, step=step + 1)
            preempted = any_rank(watch.signal is not None)
            if (t.save_every and (step + 1) % t.save_every == 0) or last or preempted:
                save_checkpoint(run, step + 1)
            if any(isinstance(v, float) and math.isnan(v) for k, v in metrics.items() if k.endswith("/loss")):
                raise FloatingPointError(f"step {step}: a loss is NaN; see {run.out / 'metrics.jsonl'}")
            if preempted and not last:
                run.sink.close()
                run.rollout.shutdown()
                raise Preempted(step + 1)
    if t.total_steps > 0:
        export_hf(run, run.out / "hf")
    run.sink.close()
    run.rollout.shutdown()  # servers we launched stop here (and at exit in any case)
    return run
