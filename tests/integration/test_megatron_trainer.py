"""backend=megatron end to end on CPU (one process, gloo, TP=1): the debug run trains two steps with
finite losses, its step-1 losses equal the torch backend's on the same config, it checkpoints through
the backend's dist-checkpoint, resumes, and its HF export loads with plain transformers. With
rollout.engine=sglang it samples from the fake SGLang server, pushes the actor's export to it and passes
the post-sync probe; with two ranks (TP=2) only rank 0 drives the server while both take part in the
collective export and probe forward, and both get the same samples and the same errors; the HF engine is
held by rank 0 alone in the same way."""

from __future__ import annotations

import contextlib
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

from support.megatron_cpu import megatron_on_cpu, one_process_world  # noqa: E402
from support.models import tiny_qwen3_config
from support.net import free_port  # noqa: E402
from support.runs import read_metrics

from tempo_mega.config import load_config  # noqa: E402
from tempo_mega.trainer import run_training  # noqa: E402


@pytest.fixture
def megatron_world(monkeypatch):
    """A 1-process torchrun world, brought up by the trainer (the backend's init_parallel)."""
    with one_process_world(monkeypatch):
        yield


def test_megatron_backend_trains_like_torch(tmp_path, megatron_world):
    common = ["experiment=debug_cpu"]
    run_training(load_config([*common, "trainer.total_steps=3", f"trainer.output_dir={tmp_path / 'torch'}"]))
    out = tmp_path / "megatron"
    run = run_training(load_config([*common, "backend=megatron", f"trainer.output_dir={out}",
                                    "trainer.total_steps=2"]))
    assert type(run.actor).__name__ == "MegatronBackend" and type(run.critic).__name__ == "MegatronBackend"
    assert type(run.rollout).__name__ == "RankZeroRollout" and type(run.rollout.engine).__name__ == "HFRolloutEngine"

    meg, ref = read_metrics(out), read_metrics(tmp_path / "torch")
    assert [x["step"] for x in meg] == [1, 2]
    for line in meg:
        assert math.isfinite(line["actor/loss"]) and math.isfinite(line["critic/loss"])
    for key in ("actor/loss", "critic/loss", "actor/grad_norm", "critic/grad_norm"):
        # step 2 also checks the actor -> HF rollout engine weight sync
        for step in (0, 1):
            assert meg[step][key] == pytest.approx(ref[step][key], abs=1e-4), (step + 1, key)

    # checkpoints are the backend's dist-checkpoints; the HF export loads with plain transformers
    ckpt = out / "checkpoints" / "step_00000002"
    assert (ckpt / "COMPLETE").exists() and (ckpt / "actor" / "backend_state.json").exists()
    from transformers import AutoModelForCausalLM

    from tempo_mega.models.critic import ValueHeadModel

    hf = AutoModelForCausalLM.from_pretrained(out / "hf" / "actor")
    exported = dict(run.actor.export_weights())
    # on the model's device (what SGLang's GPU syncs ask for): the same values, copies of the parameters
    params = {p.data_ptr() for c in run.actor.chunks for p in c.parameters()}
    for name, t in run.actor.export_weights(device=None):
        assert torch.equal(t, exported[name]) and t.data_ptr() not in params, name
    for name, t in hf.state_dict().items():
        if name in exported:
            torch.testing.assert_close(t, exported[name], msg=name)
    critic = ValueHeadModel.from_pretrained(out / "hf" / "critic")
    exported = dict(run.critic.export_weights())
    torch.testing.assert_close(critic.value_head.weight, exported["value_head.weight"])


    # resume from the dist-checkpoint (weights, AdamW moments, samplers, RNG): step 3 as uninterrupted
    run_training(load_config([*common, "backend=megatron", f"trainer.output_dir={out}", "trainer.total_steps=3",
                              "trainer.resume=true"]))
    meg = read_metrics(out)
    assert [x["step"] for x in meg] == [1, 2, 3]
    for key in ("actor/loss", "critic/loss"):
        assert meg[2][key] == pytest.approx(ref[2][key], abs=1e-4), (3, key)


def whole_and_resumed(tmp_path, overrides: list[str]) -> tuple[list[dict], list[dict]]:
    """The metrics of a 3-step run, and of the same run checkpointed at step 2 and resumed to step 3."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run_training(load_config([*overrides, "trainer.total_steps=3", f"trainer.output_dir={whole}"]))
    run_training(load_config([*overrides, "trainer.total_steps=2", "trainer.save_every=2", f"trainer.output_dir={cut}"]))
    run_training(load_config([*overrides, "trainer.total_steps=3", f"trainer.output_dir={cut}", "trainer.resume=true"]))
    a, b = read_metrics(whole), read_metrics(cut)
    assert [x["step"] for x in b] == [1, 2, 3]
    return a, b


MOE = ["model.num_experts=4", "model.num_experts_per_tok=2", "model.moe_intermediate_size=48",
       "megatron.moe_token_dispatcher=allgather"]


def test_megatron_backend_trains_a_mixture_of_experts_like_torch_and_resumes(tmp_path, megatron_world):
    """A fresh tiny Qwen3-MoE (4 experts, top-2): backend=megatron's first two TEMPO steps give the torch
    backend's losses and grad norms (HF's Qwen3MoeForCausalLM, no router loss either), the HF rollout
    engine samples from the exported experts, the MoE metrics are logged; with the router losses and
    routing replay on (the HF engine records every token's experts), a run resumed from its step-2
    checkpoint continues as the uninterrupted one."""
    common = ["experiment=debug_cpu", *MOE]
    run_training(load_config([*common, "trainer.total_steps=2", f"trainer.output_dir={tmp_path / 'torch'}"]))
    run_training(load_config([*common, "backend=megatron", "trainer.total_steps=2",
                              f"trainer.output_dir={tmp_path / 'megatron'}"]))
    meg, ref = read_metrics(tmp_path / "megatron"), read_metrics(tmp_path / "torch")
    for step in (0, 1):
        for key in ("actor/loss", "critic/loss", "actor/grad_norm", "critic/grad_norm"):
            assert meg[step][key] == pytest.approx(ref[step][key], abs=1e-4), (step + 1, key)
        for role in ("actor", "critic"):
            assert meg[step][f"{role}/moe_load_imbalance"] >= 1.0 and meg[step][f"{role}/moe_aux_loss"] > 0

    losses = [*common, "backend=megatron", "megatron.moe_aux_loss_coeff=0.01", "megatron.moe_z_loss_coeff=0.001",
              "algo.routing_replay=r3"]
    a, b = whole_and_resumed(tmp_path, losses)
    for key in ("actor/loss", "critic/loss", "actor/moe_z_loss", "actor/moe_load_imbalance",
                "actor/moe_routing_agreement", "rollout/logprob_diff_mean"):
        assert b[2][key] == pytest.approx(a[2][key], abs=1e-5), key
    # the trainer's own routing is the sampler's nearly everywhere (the weights move between mini-batches)
    assert all(0.9 < x["actor/moe_routing_agreement"] <= 1.0 for x in a)
    assert "critic/moe_routing_agreement" not in a[0]  # the critic routes on its own


def test_bf16_megatron_run_resumes_exactly(tmp_path, megatron_world):
    """What every preset runs: bf16 parameters with the distributed optimizer. A run checkpointed at step 2
    and resumed gives step 3's losses, grad norms and sampler gap of the uninterrupted run, bit for bit
    (a bf16 critic once failed at its first save)."""
    common = ["experiment=debug_cpu", "backend=megatron", "model.dtype=bfloat16", "megatron.use_distributed_optimizer=true"]
    a, b = whole_and_resumed(tmp_path, common)
    for key in ("actor/loss", "critic/loss", "actor/grad_norm", "critic/grad_norm", "rollout/logprob_diff_mean"):
        assert b[2][key] == a[2][key], key


@pytest.mark.parametrize("critic_from", ["critic_dir", "actor"])
def test_megatron_backend_from_checkpoint_dirs_trains_like_torch(tmp_path, megatron_world, critic_from):
    """model.path (and model.critic_path): every rank reads its stage's tensors from the safetensors files
    on demand (sharded here, with an index); the run equals the torch backend's from the same dirs."""
    from tempo_mega.models.critic import ValueHeadModel

    common = ["experiment=debug_cpu", "trainer.total_steps=2"]
    run_training(load_config([*common, "trainer.total_steps=1", f"trainer.output_dir={tmp_path / 'base'}"]))
    actor_dir, critic_dir = tmp_path / "base" / "hf" / "actor", tmp_path / "base" / "hf" / "critic"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(actor_dir).save_pretrained(actor_dir, max_shard_size="200KB")
    assert (actor_dir / "model.safetensors.index.json").is_file()
    critic = ValueHeadModel.from_pretrained(critic_dir)
    with torch.no_grad():  # a trained head, so that "loaded" and "fresh" differ
        critic.value_head.bias.fill_(0.25)
    critic.save_pretrained(critic_dir)
    src = [f"model.path={actor_dir}"] + ([f"model.critic_path={critic_dir}"] if critic_from == "critic_dir" else [])
    run_training(load_config([*common, *src, f"trainer.output_dir={tmp_path / 'torch'}"]))
    run = run_training(load_config([*common, *src, "backend=megatron", f"trainer.output_dir={tmp_path / 'meg'}"]))
    meg, ref = read_metrics(tmp_path / "meg"), read_metrics(tmp_path / "torch")
    for step in (0, 1):
        for key in ("actor/loss", "critic/loss", "actor/grad_norm", "critic/grad_norm"):
            assert meg[step][key] == pytest.approx(ref[step][key], abs=1e-4), (step + 1, key)
    if critic_from == "critic_dir":  # the head came from value_head.safetensors (one step moved it a little)
        assert float(dict(run.critic.export_weights())["value_head.bias"]) == pytest.approx(0.25, abs=0.01)


def test_megatron_backend_with_sglang_rollouts(tmp_path, megatron_world):
    """rollout.engine=sglang with backend=megatron against the fake SGLang server (HTTP generate with
    log-probs, disk weight sync, the post-sync probe). rollout.temperature=0.7: the samples' log-probs
    are at 0.7 (and match the trainer's), the probe compares at temperature 1 on both sides."""
    from support.fake_sglang import FakeSGLangServer
    from transformers import AutoModelForCausalLM

    from tempo_mega.data.tokenizer import build_synthetic_tokenizer
    from tempo_mega.models import fresh_qwen3_config

    overrides = ["experiment=debug_cpu", "backend=megatron", "rollout.engine=sglang", "rollout.temperature=0.7",
                 "rollout.sglang.weight_sync=disk", f"rollout.sglang.disk_dir={tmp_path / 'sync'}",
                 f"trainer.output_dir={tmp_path / 'run'}", "trainer.eval_max_prompts=2"]
    # the server starts from a model of the run's shape; the trainer's first push replaces its weights
    shape = load_config(overrides).model
    served = tmp_path / "served"
    AutoModelForCausalLM.from_config(fresh_qwen3_config(shape, build_synthetic_tokenizer())).save_pretrained(served)
    server = FakeSGLangServer(str(served))
    url = server.start()
    try:
        run = run_training(load_config([*overrides, f'rollout.sglang.urls=["{url}"]']))
        assert type(run.rollout).__name__ == "RankZeroSGLang"
        assert type(run.rollout.engine).__name__ == "SGLangRolloutEngine"
        got = read_metrics(tmp_path / "run")
        assert [x["step"] for x in got] == [1, 2]
        for line in got:
            assert math.isfinite(line["actor/loss"]) and math.isfinite(line["critic/loss"])
            # the server runs the actor's weights (temperature 1) and samples at 0.7 as the trainer scores
            assert line["rollout/probe_logprob_diff_max"] < 1e-4
            assert line["rollout/logprob_diff_max"] < 1e-4
        # one push at the start, one per step, all from the actor's export
        assert server.state.counts["/update_weights_from_disk"] == 3
        served_weights = server.state.model.state_dict()
        for name, t in run.actor.export_weights():
            torch.testing.assert_close(served_weights[name], t, msg=name)
    finally:
        server.stop()


def _tiny_qwen3():
    return tiny_qwen3_config(intermediate_size=96, max_position_embeddings=64, tie_word_embeddings=False)


def test_two_ranks_one_sglang_driver(tmp_path):
    """RankZeroSGLang in a 2-rank world (TP=2: the export gathers shards, the probe forward is a collective):
    rank 0 alone talks to the server, both ranks get the same samples, metrics and probe log-probs, and
    a push the probe rejects raises on both ranks (no rank is left waiting in a collective)."""
    from support.fake_sglang import FakeSGLangServer
    from transformers import Qwen3ForCausalLM

    served = tmp_path / "served"
    Qwen3ForCausalLM(_tiny_qwen3()).save_pretrained(served)  # replaced by rank 0's first push
    server = FakeSGLangServer(str(served))
    url = server.start()
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
               str(Path(__file__).resolve()), url, str(tmp_path / "sync"), str(tmp_path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        counts = dict(server.state.counts)
    finally:
        server.stop()
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert (r0["drives"], r1["drives"]) == (True, False)
    assert r0["probe"] < 1e-4 and r1["probe"] == r0["probe"]  # the probe's outcome reaches rank 1 too
    assert r0["samples"] and r1["samples"] == r0["samples"]
    assert [s[0] for s in r0["samples"]] == [0, 0, 1, 1]
    assert "probe failed" in r0["error"] and r1["error"] == r0["error"]  # each rank compares rank 0's answer
    # rank 0 only: two pushes, and per push one probe request; two prompts (n=2 in one request each)
    assert counts["/update_weights_from_disk"] == 2 and counts["/generate"] == 4
    # backend=megatron with the HF engine: rank 0 alone holds and samples from it
    assert (r0["drives_hf"], r1["drives_hf"]) == (True, False) and r0["hf_synced"]
    assert (r0["hf_module_on_rank"], r1["hf_module_on_rank"]) == (True, False)
    assert len(r0["hf_samples"]) == 4 and r1["hf_samples"] == r0["hf_samples"]


def _tp2_actor(seed: int):
    """A TP=2 megatron actor (temperature 0.7) of a tiny random Qwen3, inside a worker's 2-rank world."""
    from transformers import Qwen3ForCausalLM

    from tempo_mega.backends.megatron import MegatronConfig
    from tempo_mega.backends.megatron.backend import MegatronBackend

    torch.manual_seed(seed)
    hf = Qwen3ForCausalLM(_tiny_qwen3())
    return MegatronBackend("actor", hf.config, MegatronConfig(tensor_parallel_size=2, params_dtype="float32"),
                           hf_state_dict=hf.state_dict(), temperature=0.7)


def _two_rank_worker(url: str, sync_dir: str, out_dir: str) -> None:
    import torch.distributed as dist

    from tempo_mega.rollout.base import SamplingParams
    from tempo_mega.rollout.hf import HFRolloutEngine
    from tempo_mega.rollout.rank_zero import RankZeroRollout, RankZeroSGLang
    from tempo_mega.rollout.sglang import SGLangConfig
    from tempo_mega.weight_sync import WeightSync

    with megatron_on_cpu():
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        actor = _tp2_actor(seed=0)
        sg = SGLangConfig(urls=(url,), weight_sync="disk", disk_dir=sync_dir)
        rollout = RankZeroSGLang(sg, pad_token_id=0, weights_dtype=torch.float32)
        sync = WeightSync(actor, rollout, pad_token_id=0)
        res = {"drives": rollout.engine is not None}
        res["probe"] = sync.push()["rollout/probe_logprob_diff_max"]
        samples, _ = sync.generate([[1, 2, 3], [4, 5]], 2, SamplingParams(temperature=0.7, max_response_tokens=4))
        res["samples"] = [(s.prompt_index, s.response_ids, s.logprobs) for s in samples]
        try:  # weights the server gets but the trainer does not have: the probe rejects them
            rollout.update_weights((n, t + 0.05) for n, t in actor.export_weights())
            sync.probe()
        except RuntimeError as e:
            res["error"] = str(e)
        dist.barrier()  # the collectives still line up after the error
        rollout.shutdown()

        # the HF engine the same way: one copy, on rank 0, samples for both ranks
        hf_model = actor.hf_module(rank0_only=True)  # a collective
        res["hf_module_on_rank"] = hf_model is not None
        hf_rollout = RankZeroRollout(lambda: HFRolloutEngine(hf_model, pad_token_id=0))
        res["drives_hf"] = hf_rollout.engine is not None
        with torch.no_grad():  # a change only a weight sync brings to rank 0's copy
            for p in actor.chunks[0].parameters():
                p.add_(0.01)
        hf_rollout.update_weights(actor.export_weights())
        if rank == 0:
            synced = dict(hf_rollout.engine.model.state_dict())
            res["hf_synced"] = all([torch.equal(synced[n], t) for n, t in actor.export_weights() if n in synced])
        else:
            for _ in actor.export_weights():  # rank 0's check above is a collective export
                pass
        # a different seed per rank: only rank 0's draw may count
        got, _ = hf_rollout.generate([[1, 2, 3], [4, 5]], 2,
                                  SamplingParams(temperature=1.0, max_response_tokens=4, seed=rank))
        res["hf_samples"] = [(s.prompt_index, s.response_ids, s.logprobs) for s in got]
        hf_rollout.shutdown()
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()


def test_fusions_need_a_gpu_and_transformer_engine(tmp_path, megatron_world):
    from tempo_mega.trainer import setup

    with pytest.raises(ValueError, match="megatron.fusions=true needs a GPU and Transformer Engine"):
        setup(load_config(["experiment=debug_cpu", "backend=megatron", "megatron.fusions=true",
                           f"trainer.output_dir={tmp_path}"]))


def test_megatron_config_keys():
    cfg = load_config(["experiment=debug_cpu", "backend=megatron", "megatron.tensor_parallel_size=2"])
    assert cfg.backend == "megatron" and cfg.megatron.tensor_parallel_size == 2
    with pytest.raises(ValueError, match="megatron.tensor_parallel_size"):
        load_config(["backend=megatron", "megatron.tensor_parallel_size=3"])
    with pytest.raises(ValueError, match="megatron.sequence_parallel"):
        load_config(["backend=megatron", "megatron.sequence_parallel=true"])
    with pytest.raises(ValueError, match="'backend'"):
        load_config(["backend=jax"])
    with pytest.raises(ValueError, match="megatron.nonsense"):
        load_config(["backend=megatron", "+megatron.nonsense=1"])


def test_two_ranks_resync_a_restarted_server_with_tensor_sync(tmp_path):
    """weight_sync=tensor in a 2-rank world (TP=2): rank 0's engine cannot re-stream the weights to a
    server that crashed and was restarted (the export is a collective), so both ranks export them again
    and rank 0 pushes them to it; the call is generated again: both ranks get the same samples, one per
    (prompt, j), from the trainer's weights (the probe after the re-sync passes)."""
    from transformers import Qwen3ForCausalLM

    served = tmp_path / "served"
    Qwen3ForCausalLM(_tiny_qwen3()).save_pretrained(served)  # not the actor's weights: the push replaces them
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           str(Path(__file__).resolve()), "resync", str(served), str(tmp_path), str(free_port())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    r0, r1 = (torch.load(tmp_path / f"resync_rank{r}.pt", weights_only=False) for r in (0, 1))
    assert (tmp_path / "crashed").exists() and r0["restarts"] == 1
    assert len(r0["samples"]) == 4 and [s[0] for s in r0["samples"]] == [0, 0, 1, 1]
    assert r1["samples"] == r0["samples"] and r0["again"] == r0["samples"]
    assert r0["probe"] < 1e-4 and r1["probe"] == r0["probe"]
    assert r0["resyncs"] == r1["resyncs"] == 1.0
    assert "re-sending the weights" in proc.stderr


def _two_rank_resync_worker(served: str, out_dir: str, port: str) -> None:
    import torch.distributed as dist
    from support.fake_sglang import install_fake_serializer

    from tempo_mega.rollout.base import SamplingParams
    from tempo_mega.rollout.rank_zero import RankZeroSGLang
    from tempo_mega.rollout.sglang import SGLangConfig
    from tempo_mega.weight_sync import WeightSync

    install_fake_serializer()  # the client's tensor payloads, as the fake server reads them
    with megatron_on_cpu():
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        actor = _tp2_actor(seed=1)
        # generate requests: 1 = the probe after the first push, 2 and 3 = the prompts: the 3rd kills it
        extra = ("--slow-s", "0.3", "--crash-after-requests", "2", "--crash-once-file", f"{out_dir}/crashed")
        sg = SGLangConfig(model_path=served, launch_module="support.fake_sglang", base_port=int(port),
                          extra_args=extra, weight_sync="tensor", request_timeout_s=20.0, health_timeout_s=60.0)
        rollout = RankZeroSGLang(sg, pad_token_id=0, weights_dtype=torch.float32)
        sync = WeightSync(actor, rollout, pad_token_id=0)
        sync.push()
        sampling = SamplingParams(temperature=0.7, max_response_tokens=4)
        got, metrics = sync.generate([[1, 2, 3], [4, 5]], 2, sampling)
        res = {"samples": [(s.prompt_index, s.response_ids, s.logprobs) for s in got],
               "probe": metrics["rollout/probe_logprob_diff_max"],
               "restarts": rollout.engine.servers[0].restarts if rank == 0 else None,
               "resyncs": metrics.get("rollout/weight_resyncs")}
        again, _ = sync.generate([[1, 2, 3], [4, 5]], 2, sampling)  # no crash this time: the same draws
        res["again"] = [(s.prompt_index, s.response_ids, s.logprobs) for s in again]
        torch.save(res, Path(out_dir) / f"resync_rank{rank}.pt")
        rollout.shutdown()
        dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "resync":
        _two_rank_resync_worker(*sys.argv[2:5])
    else:
        _two_rank_worker(*sys.argv[1:4])


@pytest.mark.parametrize("backend", ["torch", "megatron"])
def test_warm_start_restores_lr_and_forgets_moments(tmp_path, backend, monkeypatch):
    """The supervised warm start trains at trainer.warm_start_lr, then the configured rate is back and
    the Adam moments are gone (the critic's trunk is then copied from the warmed-up actor)."""
    from tempo_mega.trainer import setup

    ctx = one_process_world(monkeypatch) if backend == "megatron" else contextlib.nullcontext()
    with ctx:
        run = setup(load_config(["experiment=debug_cpu", f"backend={backend}", "trainer.warm_start_steps=2",
                                 "trainer.warm_start_lr=1e-3", f"trainer.output_dir={tmp_path}"]))
        assert run.first_line["warmup/steps"] == 2.0 and math.isfinite(run.first_line["warmup/nll_last"])
        assert [g["lr"] for g in run.actor.optimizer.param_groups] == \
            [run.cfg.algo.actor.lr] * len(run.actor.optimizer.param_groups)
        inner = [o.optimizer for o in run.actor._sub_optimizers] if backend == "megatron" else [run.actor.optimizer]
        # forgotten: no state (torch), or zero moments at step 0, kept allocated (megatron)
        states = [st for opt in inner for st in opt.state.values()]
        assert all(float(st["step"]) == 0 and not st["exp_avg"].any() and not st["exp_avg_sq"].any()
                   for st in states)
        assert (len(states) > 0) == (backend == "megatron")
        actor_trunk = {n: t for n, t in run.actor.export_weights() if n.startswith("model.")}
        critic = dict(run.critic.export_weights())
        for name, t in actor_trunk.items():
            assert torch.equal(critic[name], t), name
        run.rollout.shutdown()


@pytest.mark.parametrize("backend", ["torch", "megatron"])
def test_kernels_enable_routes_both_backends_losses_through_the_packed_kernels(tmp_path, backend, monkeypatch):
    """kernels.enable=true: the GSPO and value losses run as tempo_mega.kernels' packed gspo_loss /
    seq_clipped_value_loss (their torch paths on CPU) and the critic's head asks fused_value_head for
    its kernel ("auto"), on either backend, with the losses of kernels.enable=false, where none of the
    loss kernels runs and the head asks for the torch reference. Recorded at the kernels' dispatch."""
    import tempo_mega.kernels.seq_losses as seq_losses
    import tempo_mega.kernels.value_head as value_head

    calls: list[tuple[str, str, str]] = []  # (kernel, impl asked for, impl that ran)

    def recording(module):
        real = module.resolve_impl

        def resolve_impl(impl, *tensors, name="kernel"):
            ran = real(impl, *tensors, name=name)
            calls.append((name, impl, ran))
            return ran

        monkeypatch.setattr(module, "resolve_impl", resolve_impl)

    recording(seq_losses)
    recording(value_head)
    ctx = one_process_world(monkeypatch) if backend == "megatron" else contextlib.nullcontext()
    runs = {}
    with ctx:
        for enable in ("false", "true"):
            calls.clear()
            out = tmp_path / enable
            run_training(load_config(["experiment=debug_cpu", f"backend={backend}", f"kernels.enable={enable}",
                                      "trainer.total_steps=1", f"trainer.output_dir={out}"]))
            runs[enable] = (read_metrics(out)[0], set(calls))
            if backend == "megatron":  # the next run brings the process group up again
                import torch.distributed as dist
                from megatron.core import parallel_state

                parallel_state.destroy_model_parallel()
                dist.destroy_process_group()
    (plain, plain_calls), (fused, fused_calls) = runs["false"], runs["true"]
    assert {("gspo_loss", "auto", "torch"), ("seq_clipped_value_loss", "auto", "torch")} <= fused_calls
    assert not {c for c in plain_calls if c[0] in ("gspo_loss", "seq_clipped_value_loss")}
    if backend == "megatron":  # the torch backend's plain critic does not call fused_value_head at all
        assert ("fused_value_head", "torch", "torch") in plain_calls
    assert ("fused_value_head", "auto", "torch") in fused_calls
    assert ("fused_value_head", "auto", "torch") not in plain_calls
    for key in ("actor/loss", "critic/loss", "actor/grad_norm", "critic/grad_norm"):
        assert fused[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-6), key
