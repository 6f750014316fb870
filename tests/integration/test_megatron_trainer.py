"""backend=megatron end to end on CPU (one process, gloo, TP=1): the debug run trains two steps with
finite losses, its step-1 losses equal the torch backend's on the same config, it checkpoints through
the backend's dist-checkpoint, resumes, and its HF export loads with plain transformers."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/megatron_cpu_support.py

from megatron_cpu_support import free_port, megatron_on_cpu  # noqa: E402

from tempo_mega.config import load_config  # noqa: E402
from tempo_mega.trainer import run_training  # noqa: E402


def lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def megatron_world(monkeypatch):
    """The environment of a 1-process torchrun world; torch.distributed and megatron's parallel state
    are brought up by the trainer (the backend's init_parallel) and torn down here."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(key, value)
    with megatron_on_cpu():
        try:
            yield
        finally:
            parallel_state.destroy_model_parallel()
            if dist.is_initialized():
                dist.destroy_process_group()


def test_megatron_backend_trains_like_torch(tmp_path, megatron_world):
    common = ["experiment=debug_cpu"]
    run_training(load_config([*common, "trainer.total_steps=3", f"trainer.output_dir={tmp_path / 'torch'}"]))
    out = tmp_path / "megatron"
    run = run_training(load_config([*common, "backend=megatron", f"trainer.output_dir={out}",
                                    "trainer.total_steps=2"]))
    assert type(run.actor).__name__ == "MegatronBackend" and type(run.critic).__name__ == "MegatronBackend"

    meg, ref = lines(out), lines(tmp_path / "torch")
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

    from tempo_mega.backends.torch import ValueHeadModel

    hf = AutoModelForCausalLM.from_pretrained(out / "hf" / "actor")
    exported = dict(run.actor.export_weights())
    for name, t in hf.state_dict().items():
        if name in exported:
            torch.testing.assert_close(t, exported[name], msg=name)
    critic = ValueHeadModel.from_pretrained(out / "hf" / "critic")
    exported = dict(run.critic.export_weights())
    torch.testing.assert_close(critic.value_head.weight, exported["value_head.weight"])


    # resume from the dist-checkpoint (weights, AdamW moments, samplers, RNG): step 3 as uninterrupted
    run_training(load_config([*common, "backend=megatron", f"trainer.output_dir={out}", "trainer.total_steps=3",
                              "trainer.resume=true"]))
    meg = lines(out)
    assert [x["step"] for x in meg] == [1, 2, 3]
    for key in ("actor/loss", "critic/loss"):
        assert meg[2][key] == pytest.approx(ref[2][key], abs=1e-4), (3, key)


def test_megatron_config_keys():
    cfg = load_config(["experiment=debug_cpu", "backend=megatron", "megatron.tensor_parallel_size=2"])
    assert cfg.backend == "megatron" and cfg.megatron["tensor_parallel_size"] == 2
    with pytest.raises(ValueError, match="megatron.tensor_parallel_size"):
        load_config(["backend=megatron", "megatron.tensor_parallel_size=3"])
    with pytest.raises(ValueError, match="megatron.sequence_parallel"):
        load_config(["backend=megatron", "megatron.sequence_parallel=true"])
    with pytest.raises(ValueError, match="'backend'"):
        load_config(["backend=jax"])
    with pytest.raises(ValueError, match="megatron.nonsense"):
        load_config(["backend=megatron", "+megatron.nonsense=1"])
