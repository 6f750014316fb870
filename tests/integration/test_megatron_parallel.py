"""MegatronBackend on CPU with gloo: every parallel layout (TP=2, TP=2 with sequence parallel, PP=2, TP=2 x PP=2, PP=2 with virtual
stages, DP=2 with the distributed optimizer, full activation recompute) gives the same log-probs, values and post-step weights as
TP=PP=1, for an untied actor, a tied actor and the critic; TP=1 agrees with the torch backend; a
dist-checkpoint saved at TP=2 x PP=2 loads at TP=1, one saved with the distributed optimizer at DP=2 loads
at TP=2 (DP=1), and both continue identically. Each layout runs in its
own ``torchrun``-like subprocess world (spawned, under a timeout)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

HERE = Path(__file__).resolve()

# name -> (world size, megatron config keys)
LAYOUTS = {
    "tp1": (1, {}),
    "tp2": (2, {"tensor_parallel_size": 2}),
    "tp2sp": (2, {"tensor_parallel_size": 2, "sequence_parallel": True}),
    "cp2": (2, {"context_parallel_size": 2}),
    "tp2cp2sp": (4, {"tensor_parallel_size": 2, "context_parallel_size": 2, "sequence_parallel": True}),
    "pp2": (2, {"pipeline_parallel_size": 2}),
    "tp2pp2": (4, {"tensor_parallel_size": 2, "pipeline_parallel_size": 2}),
    "pp2vpp2": (2, {"pipeline_parallel_size": 2, "virtual_pipeline_parallel_size": 2}),
    "dp2dist": (2, {"use_distributed_optimizer": True}),
    "recompute": (1, {"recompute": "full"}),
    "tp2dist": (2, {"tensor_parallel_size": 2, "use_distributed_optimizer": True}),  # loads dp2dist's checkpoint
}
ROLES = ("actor", "tied", "critic")


def run_world(tmp: Path, layout: str, mode: str, ckpt: Path | None = None) -> dict:
    """This file as a torchrun script in the world of ``layout``."""
    from support.worlds import run_world as run

    return run(HERE, LAYOUTS[layout][0], tmp, layout, mode, ckpt, timeout_s=300)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """``world(name)``: the results of one torchrun world, run on first use and kept for the module, so
    that one layout's test (``-k pp2``) runs only the worlds it needs: a layout's name is its training
    run (tp2pp2 and dp2dist also save a checkpoint); "loaded" is tp1 loading tp2pp2's checkpoint and
    "loaded_dist" tp2dist loading dp2dist's."""
    tmp = tmp_path_factory.mktemp("megatron")
    saves = {"tp2pp2": tmp / "ckpt_tp2pp2", "dp2dist": tmp / "ckpt_dp2dist"}
    loads = {"loaded": ("tp1", "tp2pp2"), "loaded_dist": ("tp2dist", "dp2dist")}
    done: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in done:
            if name in loads:
                layout, saved = loads[name]
                get(saved)  # its checkpoint first
                done[name] = run_world(tmp, layout, "load", saves[saved])
            else:
                done[name] = run_world(tmp, name, "train", saves.get(name))
        return done[name]

    return get


def test_tp1_matches_torch_backend(world):
    tp1 = world("tp1")
    for key in ("logprobs", "tied_logprobs", "values"):
        torch.testing.assert_close(tp1[key], tp1[f"torch_{key}"], atol=1e-4, rtol=1e-4)
    for role in ROLES:
        for name, t in tp1[f"torch_{role}_weights"].items():
            torch.testing.assert_close(tp1[f"{role}_weights"][name], t, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("layout", [k for k in LAYOUTS if k not in ("tp1", "tp2dist")])
def test_layout_matches_tp1(world, layout):
    ref, got = world("tp1"), world(layout)
    for key in ("logprobs", "tied_logprobs", "values", "logprobs_after", "tied_logprobs_after", "values_after"):
        torch.testing.assert_close(got[key], ref[key], atol=1e-5, rtol=1e-5, msg=key)
    for role in ROLES:
        assert got[f"{role}_weights"].keys() == ref[f"{role}_weights"].keys()
        for name, t in ref[f"{role}_weights"].items():  # two optimizer steps
            torch.testing.assert_close(got[f"{role}_weights"][name], t, atol=1e-4, rtol=1e-4, msg=f"{role} {name}")
        for key in ("loss", "grad_norm", "num_micro_batches"):
            name = f"{'actor' if role != 'critic' else 'critic'}/{key}"
            assert got[f"{role}_metrics"][name] == pytest.approx(ref[f"{role}_metrics"][name], rel=1e-5), name


@pytest.mark.parametrize(("saved", "loaded"), [("tp2pp2", "loaded"), ("dp2dist", "loaded_dist")],
                         ids=["tp2pp2-to-tp1", "dp2-distopt-to-tp2-distopt"])
def test_checkpoint_loads_at_another_layout(world, saved, loaded):
    saved, loaded = world(saved), world(loaded)
    for role in ROLES:
        for name, t in saved[f"{role}_weights"].items():
            assert torch.equal(loaded[f"{role}_weights"][name], t), name
    # the optimizer moments came back too: one more identical step agrees
    torch.testing.assert_close(loaded["logprobs_after_2nd"], saved["logprobs_after_2nd"], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- worker
from support.worlds import finish_world, train_or_load  # noqa: E402
from support.worlds import pg_loss as _pg_loss  # noqa: E402
from support.worlds import value_loss as _value_loss  # noqa: E402


def _worker(layout: str, mode: str, out_path: str, ckpt: str) -> None:
    import torch.distributed as dist
    from support.megatron_cpu import megatron_on_cpu
    from support.models import hf_model
    from support.models import megatron_tiny_config as tiny_config

    from tempo_mega.backends.megatron import MegatronConfig
    from tempo_mega.backends.megatron.backend import MegatronBackend
    from tempo_mega.backends.torch import OptimConfig, ValueHeadModel, build_actor, build_critic
    from tempo_mega.batch import RolloutBatch

    torch.use_deterministic_algorithms(True)
    with megatron_on_cpu():
        dist.init_process_group("gloo")
        cfg, cfg_tied = tiny_config(False, layers=4), tiny_config(True, layers=4)
        critic_ref = ValueHeadModel.from_actor(hf_model(cfg), seed=3)
        sds = {"actor": hf_model(cfg).state_dict(), "tied": hf_model(cfg_tied, seed=1).state_dict(),
               "critic": critic_ref.state_dict()}
        gen = torch.Generator().manual_seed(5)
        prompts = [[int(x) for x in torch.randint(0, 128, (n,), generator=gen)] for n in (3, 5, 2, 4, 3)]
        responses = [[int(x) for x in torch.randint(0, 128, (n,), generator=gen)] for n in (4, 2, 5, 3, 1)]
        batch = RolloutBatch.from_samples(prompts, responses, is_labeled=[True] * 5, group_ids=[0, 0, 1, 1, 2],
                                          pad_token_id=0)
        batch.advantages = torch.randn(batch.response_mask.shape, generator=gen)
        batch.returns = torch.randn(batch.response_mask.shape, generator=gen)
        # mini-batches of 3 and 2 rows, micro-batches of <= 8 tokens: several per mini-batch
        # Adam with eps 1 (>> |grad|) moves each weight by ~lr * grad: the post-step weights compare the
        # gradients of the layouts linearly (with a small eps, a near-zero gradient summed in another
        # order flips to a +-lr update, float noise that would hide or fake a difference)
        optim = OptimConfig(lr=1.0, eps=1.0, mini_batch_size=3, max_tokens_per_micro_batch=8, grad_clip=0.5)
        # log-probs in chunks of 3 response tokens (recomputed in the backward): several per micro-batch
        mc = MegatronConfig(params_dtype="float32", logprob_chunk_tokens=3, **LAYOUTS[layout][1])
        backends = {"actor": MegatronBackend("actor", cfg, mc, optim, hf_state_dict=sds["actor"]),
                    "tied": MegatronBackend("actor", cfg_tied, mc, optim, hf_state_dict=sds["tied"]),
                    "critic": MegatronBackend("critic", cfg, mc, optim, hf_state_dict=sds["critic"])}
        losses = {"actor": _pg_loss, "tied": _pg_loss, "critic": _value_loss}
        keys = {"actor": "logprobs", "tied": "tied_logprobs", "critic": "values"}

        res = train_or_load(backends, batch, losses, mode, ckpt, keys)
        if mode == "train" and layout == "tp1":  # the reference: the torch backend on the same weights
            ref = {"actor": build_actor(hf_model(cfg), optim), "tied": build_actor(hf_model(cfg_tied, seed=1), optim),
                   "critic": build_critic(critic_ref, optim)}
            for role, b in ref.items():
                res[f"torch_{keys[role]}"] = b.forward_values(batch) if role == "critic" else b.forward_logprobs(batch)
                b.train_step(batch, losses[role])
                res[f"torch_{role}_weights"] = dict(b.export_weights())
        finish_world(res, out_path)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4])
