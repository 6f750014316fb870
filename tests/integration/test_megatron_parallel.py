"""MegatronBackend on CPU with gloo: TP=2 agrees with TP=1 (log-probs, values, post-step weights), a
dist-checkpoint saved at TP=2 loads at TP=1, and TP=1 agrees with the torch backend. Each layout runs
in its own ``torchrun``-like subprocess world (spawned, under a timeout)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))  # tests/megatron_cpu_support.py


def run_world(tmp: Path, tp: int, mode: str, ckpt: Path | None = None, timeout_s: int = 180) -> dict:
    """This file as a torchrun script with ``tp`` processes (TP = world size)."""
    from megatron_cpu_support import free_port

    out = tmp / f"out_{mode}_tp{tp}.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={tp}", f"--master-port={free_port()}",
           str(HERE), str(tp), mode, str(out), str(ckpt or "")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=HERE.parents[2])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("megatron")
    ckpt = tmp / "ckpt_tp2"
    tp1 = run_world(tmp, 1, "train")
    tp2 = run_world(tmp, 2, "train", ckpt)
    loaded = run_world(tmp, 1, "load", ckpt)
    return tp1, tp2, loaded


def test_tp1_matches_torch_backend(results):
    tp1, _, _ = results
    for key in ("logprobs", "values"):
        torch.testing.assert_close(tp1[key], tp1[f"torch_{key}"], atol=1e-4, rtol=1e-4)
    for role in ("actor", "critic"):
        for name, t in tp1[f"torch_{role}_weights"].items():
            torch.testing.assert_close(tp1[f"{role}_weights"][name], t, atol=1e-4, rtol=1e-4, msg=name)


def test_tp2_matches_tp1(results):
    tp1, tp2, _ = results
    for key in ("logprobs", "values", "logprobs_after"):
        torch.testing.assert_close(tp2[key], tp1[key], atol=1e-5, rtol=1e-5)
    for role in ("actor", "critic"):
        for name, t in tp1[f"{role}_weights"].items():
            torch.testing.assert_close(tp2[f"{role}_weights"][name], t, atol=1e-4, rtol=1e-4, msg=name)  # Adam, lr 1e-2
    assert tp1["actor_metrics"]["actor/grad_norm"] == pytest.approx(tp2["actor_metrics"]["actor/grad_norm"], rel=1e-5)


def test_checkpoint_saved_at_tp2_loads_at_tp1(results):
    _, tp2, loaded = results
    for role in ("actor", "critic"):
        for name, t in tp2[f"{role}_weights"].items():
            assert torch.equal(loaded[f"{role}_weights"][name], t), name
    # the optimizer moments came back too: one more identical step agrees
    torch.testing.assert_close(loaded["logprobs_after_2nd"], tp2["logprobs_after_2nd"], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- worker
def _pg_loss(logprobs, micro):
    mask = micro.response_mask.bool()
    return -(logprobs * micro.advantages)[mask].sum() / mask.sum(), {"lp_mean": float(logprobs[mask].mean())}


def _value_loss(values, micro):
    mask = micro.response_mask.bool()
    return ((values - micro.returns) ** 2)[mask].sum() / mask.sum(), {}


_pg_loss.agg = "token"
_value_loss.agg = "token"


def _worker(tp: int, mode: str, out_path: str, ckpt: str) -> None:
    import torch.distributed as dist
    from megatron_cpu_support import megatron_on_cpu
    from test_megatron_convert import hf_model, tiny_config

    from tempo_mega.backends.megatron import MegatronConfig
    from tempo_mega.backends.megatron.backend import MegatronBackend
    from tempo_mega.backends.torch import OptimConfig, ValueHeadModel, build_actor, build_critic
    from tempo_mega.batch import RolloutBatch

    torch.use_deterministic_algorithms(True)
    with megatron_on_cpu():
        dist.init_process_group("gloo")
        cfg = tiny_config(False)
        hf = hf_model(cfg)
        critic_ref = ValueHeadModel.from_actor(hf_model(cfg), seed=3)
        actor_sd, critic_sd = hf.state_dict(), critic_ref.state_dict()
        gen = torch.Generator().manual_seed(5)
        prompts = [[int(x) for x in torch.randint(0, 128, (n,), generator=gen)] for n in (3, 5, 2, 4)]
        responses = [[int(x) for x in torch.randint(0, 128, (n,), generator=gen)] for n in (4, 2, 5, 3)]
        batch = RolloutBatch.from_samples(prompts, responses, is_labeled=[True] * 4, group_ids=[0, 0, 1, 1],
                                          pad_token_id=0)
        batch.advantages = torch.randn(batch.response_mask.shape, generator=gen)
        batch.returns = torch.randn(batch.response_mask.shape, generator=gen)
        optim = OptimConfig(lr=1e-2, mini_batch_size=2, max_tokens_per_micro_batch=8, grad_clip=0.5)
        mc = MegatronConfig(tensor_parallel_size=tp, params_dtype="float32")
        actor = MegatronBackend("actor", cfg, mc, optim, hf_state_dict=actor_sd)
        critic = MegatronBackend("critic", cfg, mc, optim, hf_state_dict=critic_sd)
        res = {}
        if mode == "load":
            actor.load(Path(ckpt) / "actor")
            critic.load(Path(ckpt) / "critic")
        else:
            res["logprobs"] = actor.forward_logprobs(batch)
            res["values"] = critic.forward_values(batch)
            res["actor_metrics"] = actor.train_step(batch, _pg_loss)
            res["critic_metrics"] = critic.train_step(batch, _value_loss)
            res["logprobs_after"] = actor.forward_logprobs(batch)
        for role, backend in (("actor", actor), ("critic", critic)):
            res[f"{role}_weights"] = dict(backend.export_weights(dtype=None))
        if ckpt:
            if mode != "load":
                actor.save(Path(ckpt) / "actor")
                critic.save(Path(ckpt) / "critic")
            actor.train_step(batch, _pg_loss)
            res["logprobs_after_2nd"] = actor.forward_logprobs(batch)
        if mode == "train" and tp == 1:  # the reference: the torch backend on the same weights
            t_actor = build_actor(hf_model(cfg), optim)
            t_critic = build_critic(critic_ref, optim)
            res["torch_logprobs"] = t_actor.forward_logprobs(batch)
            res["torch_values"] = t_critic.forward_values(batch)
            t_actor.train_step(batch, _pg_loss)
            t_critic.train_step(batch, _value_loss)
            res["torch_actor_weights"] = dict(t_actor.export_weights())
            res["torch_critic_weights"] = dict(t_critic.export_weights())
        if dist.get_rank() == 0:
            torch.save(res, out_path)
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    _worker(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
