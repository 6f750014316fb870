"""A megatron dist-checkpoint save that fails is an error naming the directory, within seconds, and the
checkpoint saved before it still loads. megatron-core's own writer waits for its workers on a queue's
``join()``: a worker that died (0.16 forks them and they die without psutil; a killed worker) kept that
wait, and the run, going forever."""

from __future__ import annotations

import functools
import time

import pytest
import torch

pytest.importorskip("megatron.core")

from support.megatron_cpu import one_process_world  # noqa: E402


def _tiny_actor():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tempo_mega.backends.megatron import MegatronConfig
    from tempo_mega.backends.megatron.backend import MegatronBackend

    cfg = Qwen3Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                      vocab_size=64, intermediate_size=48, max_position_embeddings=32, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(cfg)
    return MegatronBackend("actor", cfg, MegatronConfig(params_dtype="float32"), hf_state_dict=hf.state_dict())


def _weights(backend) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in backend.export_weights()}


class _WorkerDied(BaseException):
    """What a worker that is killed looks like to its writer: it ends without a result and without
    marking its task done (megatron's worker catches Exception only)."""


@pytest.mark.parametrize("fault", ["write_fails", "worker_dies"])
def test_failed_save_raises_naming_the_dir_and_the_previous_checkpoint_loads(tmp_path, monkeypatch, fault):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from tempo_mega.backends.megatron.dist_ckpt import DistCheckpointWriteError

    with one_process_world(monkeypatch):
        actor = _tiny_actor()
        good = tmp_path / "good"
        actor.save(good)
        saved = _weights(actor)

        real_write_item = filesystem_async._write_item
        calls = []

        @functools.wraps(real_write_item)  # megatron reads its signature (serialization_format)
        def failing_write_item(*args, **kwargs):
            calls.append(1)
            if len(calls) > 1:  # the first item is written: the failure comes mid-file
                if fault == "write_fails":
                    raise OSError(28, "No space left on device")
                raise _WorkerDied("killed")
            return real_write_item(*args, **kwargs)

        monkeypatch.setattr(filesystem_async, "_write_item", failing_write_item)
        bad = tmp_path / "bad"
        start = time.monotonic()
        with pytest.raises(DistCheckpointWriteError) as err:
            actor.save(bad)
        assert time.monotonic() - start < 60
        assert str(bad) in str(err.value)
        assert len(calls) > 1  # the writer did fail mid-save, not before it
        assert not (bad / "backend_state.json").exists()  # not marked as the backend's checkpoint
        monkeypatch.setattr(filesystem_async, "_write_item", real_write_item)

        with torch.no_grad():  # move the weights, so that loading has something to restore
            for c in actor.chunks:
                for p in c.parameters():
                    p.add_(1.0)
        assert any(not torch.equal(t, saved[n]) for n, t in _weights(actor).items())
        actor.load(good)
        for name, t in _weights(actor).items():
            assert torch.equal(t, saved[name]), name


def test_save_without_psutil_is_an_error_before_any_write(tmp_path, monkeypatch):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    with one_process_world(monkeypatch):
        actor = _tiny_actor()
        monkeypatch.setattr(filesystem_async, "HAVE_PSUTIL", False)
        with pytest.raises(ImportError, match="psutil") as err:
            actor.save(tmp_path / "ckpt")
        assert str(tmp_path / "ckpt") in str(err.value)


@pytest.mark.parametrize("distributed", [False, True], ids=["optimizer", "distributed-optimizer"])
def test_bf16_actor_and_critic_checkpoint_and_continue(tmp_path, monkeypatch, distributed):
    """A bf16 model (what every preset trains) checkpoints both roles after a step and a fresh backend
    loaded from it continues identically. The critic's value head once was a float32 parameter among bf16
    ones, which megatron-core's optimizers cannot map to their checkpointed state (every bf16 critic's
    first save failed); it is now in the model's dtype, computed in float32, exported in float32."""
    from support.models import hf_model
    from support.models import megatron_tiny_config as tiny_config

    from tempo_mega.backends.megatron import MegatronConfig
    from tempo_mega.backends.megatron.backend import MegatronBackend
    from tempo_mega.backends.torch import OptimConfig, ValueHeadModel
    from tempo_mega.batch import RolloutBatch

    def loss(out, micro):
        mask = micro.response_mask.bool()
        return ((out - micro.returns) ** 2)[mask].mean(), {}

    loss.agg = "token"
    cfg = tiny_config(False)
    sds = {"actor": hf_model(cfg).state_dict(), "critic": ValueHeadModel.from_actor(hf_model(cfg), seed=3).state_dict()}
    batch = RolloutBatch.from_samples([[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10]], is_labeled=[True, True],
                                      group_ids=[0, 1], pad_token_id=0)
    batch.returns = torch.randn(batch.response_mask.shape, generator=torch.Generator().manual_seed(0))
    mc = MegatronConfig(params_dtype="bfloat16", use_distributed_optimizer=distributed)
    with one_process_world(monkeypatch):
        for role, sd in sds.items():
            def build():
                return MegatronBackend(role, cfg, mc, OptimConfig(lr=1e-2), hf_state_dict=sd)  # noqa: B023

            def forward(b):
                return b.forward_values(batch) if role == "critic" else b.forward_logprobs(batch)  # noqa: B023

            a = build()
            a.train_step(batch, loss)
            a.save(tmp_path / f"{role}_{distributed}")
            b = build()
            b.load(tmp_path / f"{role}_{distributed}")
            assert torch.equal(forward(a), forward(b)), role
            a.train_step(batch, loss), b.train_step(batch, loss)  # the moments came back too
            assert torch.equal(forward(a), forward(b)), role
            if role == "critic":
                head = dict(a.export_weights())["value_head.weight"]
                assert head.dtype == torch.float32
