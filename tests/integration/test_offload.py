"""trainer.offload_during_rollout (tempo_mega/offload.py): the trainer's optimizer state (and with ``all``
its weights and gradient buffers) leave their device while the engine generates and come back bit for
bit, in place; a backend that was offloaded between two steps trains exactly like one that was not. The
same code runs on the CPU: the storages are copied to a second host buffer and freed, as on a GPU they
go to pinned host memory."""

from __future__ import annotations

import pytest
import torch
from support.models import tiny_qwen3
from support.worlds import pg_loss, value_loss

from tempo_mega.batch import RolloutBatch
from tempo_mega.offload import HostOffload, OffloadSet, TrainerOffload


def _batch(vocab: int) -> RolloutBatch:
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (3, 5, 2, 4)]
    responses = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (4, 2, 5, 3)]
    b = RolloutBatch.from_samples(prompts, responses, is_labeled=[True] * 4, group_ids=[0, 0, 1, 1], pad_token_id=0)
    mask = b.response_mask.float()
    b.advantages = torch.randn(mask.shape, generator=g) * mask
    b.returns = torch.rand(mask.shape, generator=g) * mask
    b.old_logprobs = torch.zeros(mask.shape)
    return b


def test_host_offload_frees_and_restores_storages_in_place():
    a, b, g = torch.randn(100), torch.randn(3, 4), torch.ones(50)
    view = a[10:20]  # a view of a: its storage is moved once, and the view sees the data again
    want_a, want_b = a.clone(), b.clone()
    h = HostOffload()
    freed = h.offload(OffloadSet(keep=[a, view, b], drop=[g]))
    assert freed == (100 + 12 + 50) * 4 and h.active
    assert a.untyped_storage().nbytes() == b.untyped_storage().nbytes() == g.untyped_storage().nbytes() == 0
    assert h.offload(OffloadSet(keep=[a])) == freed  # idempotent: nothing moved twice
    h.reload()
    assert not h.active and torch.equal(a, want_a) and torch.equal(view, want_a[10:20]) and torch.equal(b, want_b)
    assert torch.equal(g, torch.zeros(50))  # dropped: back zeroed, as a gradient buffer before a step
    h.reload()  # idempotent too
    assert torch.equal(a, want_a)
    buffers = dict(h._buffers)
    a.mul_(2)  # the next cycle: the same host buffers (pinned once per run on a GPU), the new data
    h.offload(OffloadSet(keep=[a, b], drop=[g]))
    assert h._buffers == buffers and all(h._buffers[k] is buffers[k] for k in buffers)
    h.reload()
    assert torch.equal(a, 2 * want_a) and torch.equal(b, want_b)


def test_a_bad_mode_names_the_key():
    with pytest.raises(ValueError, match="trainer.offload_during_rollout"):
        TrainerOffload("weights", [])
    assert TrainerOffload("none", []).offload() == {}


def _round_trip(make, batch, loss, mode: str) -> None:
    """Twins trained one step; one offloaded and reloaded: its state is bit-equal, what the mode keeps on
    the device stays there, and the next step equals the twin's."""
    a, b = make(), make()
    for x in (a, b):
        x.train_step(batch, loss)
    held = a.offload_set(mode)
    assert held.keep
    before = [t.detach().clone() for t in held.keep]
    weights = a.offload_set("all").keep  # what "all" would move: the optimizer's and the weights
    off = TrainerOffload(mode, [a])
    n = sum(t.numel() for _, t in a.export_weights())
    gib = off.offload()["perf/offloaded_gib"]
    assert off.active and gib * 2**30 >= 8 * n  # at least Adam's two float32 moments of every weight
    assert all(t.untyped_storage().nbytes() == 0 for t in held.keep)
    if mode == "optimizer":  # the weights stay where they are
        kept = [t for t in weights if all(t.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()
                                          for k in held.keep)]
        assert kept and all(t.untyped_storage().nbytes() > 0 for t in kept)
    off.reload()
    assert all(torch.equal(t, w) for t, w in zip(held.keep, before))
    for x in (a, b):
        x.train_step(batch, loss)
    wa, wb = dict(a.export_weights()), dict(b.export_weights())
    assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)


@pytest.mark.parametrize("mode", ["optimizer", "all"])
@pytest.mark.parametrize("role", ["actor", "critic"])
def test_torch_backend_offload_round_trip(mode, role):
    from tempo_mega.backends.torch import build_actor, build_critic

    build = build_actor if role == "actor" else build_critic
    _round_trip(lambda: build(tiny_qwen3(3), seed=1), _batch(128), pg_loss if role == "actor" else value_loss, mode)


@pytest.mark.parametrize("mode", ["optimizer", "all"])
@pytest.mark.parametrize("dtype, distributed", [("float32", False), ("bfloat16", True)])
def test_megatron_backend_offload_round_trip(monkeypatch, mode, dtype, distributed):
    pytest.importorskip("megatron.core")
    from support.megatron_cpu import one_process_world

    from tempo_mega.backends.megatron import MegatronConfig
    from tempo_mega.backends.megatron.backend import MegatronBackend

    hf = tiny_qwen3(3)
    mc = MegatronConfig(params_dtype=dtype, use_distributed_optimizer=distributed)
    with one_process_world(monkeypatch):
        for role, loss in (("actor", pg_loss), ("critic", value_loss)):
            _round_trip(lambda role=role: MegatronBackend(role, hf.config, mc, hf_state_dict=hf.state_dict(), seed=1),
                        _batch(hf.config.vocab_size), loss, mode)


@pytest.mark.gpu
def test_cuda_offload_frees_device_memory_into_pinned_buffers():
    """On a GPU: the device memory the storages held is free while they are away (torch's allocator
    counts it, empty_cache hands it back), the copies sit in pinned host memory, and the data comes back."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    weights = torch.randn(64, 2**20, device="cuda")  # 256 MiB
    moments = [torch.randn(32, 2**20, device="cuda") for _ in range(2)]
    want = [t.clone().cpu() for t in (weights, *moments)]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    h = HostOffload()
    freed = h.offload(OffloadSet(keep=[weights, *moments]))
    assert freed == (64 + 64) * 2**20 * 4
    assert before - torch.cuda.memory_allocated() >= freed
    assert all(b.is_pinned() for b in h._buffers.values())
    h.reload()
    assert all(torch.equal(t.cpu(), w) for t, w in zip((weights, *moments), want))
