"""TorchBackend against plain references: unpadded HF forwards, one-micro-batch training, torch's own
grad-norm and AdamW, HF save/load."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from support.models import tiny_qwen3_config
from transformers import Qwen3Config, Qwen3ForCausalLM

from tempo_mega.backends.base import TrainBackend
from tempo_mega.backends.torch import (
    OptimConfig,
    TorchBackend,
    ValueHeadModel,
    build_actor,
    build_critic,
)
from tempo_mega.batch import RolloutBatch

VOCAB = 61
TEMPERATURE = 0.7


def tiny_config() -> Qwen3Config:
    return tiny_qwen3_config(vocab_size=VOCAB, intermediate_size=128, tie_word_embeddings=True)


def tiny_actor(seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(tiny_config()).eval()


def make_batch(seed: int = 0, rows: int = 6) -> tuple[RolloutBatch, list[list[int]], list[list[int]]]:
    """Prompts of 2..7 tokens, responses of 0..6 tokens (row 1 has an empty response)."""
    g = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for i in range(rows):
        p_len = int(torch.randint(2, 8, (1,), generator=g))
        r_len = 0 if i == 1 else int(torch.randint(1, 7, (1,), generator=g))
        prompts.append(torch.randint(1, VOCAB, (p_len,), generator=g).tolist())
        responses.append(torch.randint(1, VOCAB, (r_len,), generator=g).tolist())
    batch = RolloutBatch.from_samples(prompts, responses, is_labeled=[True] * rows,
                                      group_ids=list(range(rows)), pad_token_id=0)
    return batch, prompts, responses


def seq_loss(out: torch.Tensor, mb: RolloutBatch):
    """Mean over rows with tokens of the row's masked mean of -out."""
    mask = mb.response_mask.float()
    n = mask.sum(-1)
    rows = n > 0
    per_row = (-out * mask).sum(-1)[rows] / n[rows]
    return per_row.mean(), {"rows": float(rows.sum())}


def token_loss(out: torch.Tensor, mb: RolloutBatch):
    mask = mb.response_mask.float()
    return ((out - 0.3) ** 2 * mask).sum() / mask.sum(), {}


token_loss.agg = "token"
seq_loss.agg = "seq"


def params_close(a: torch.nn.Module, b: torch.nn.Module, atol: float) -> None:
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb
        torch.testing.assert_close(pa, pb, atol=atol, rtol=0, msg=na)


def params_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na


# ---------------------------------------------------------------------------------------- forwards
@torch.no_grad()
def reference_logprobs(model, prompts, responses, temperature):
    out = []
    for p, r in zip(prompts, responses):
        logits = model(torch.tensor([p + r])).logits[0].float() / temperature
        lsm = torch.log_softmax(logits, -1)
        out.append([float(lsm[len(p) + t - 1, tok]) for t, tok in enumerate(r)])
    return out


@torch.no_grad()
def reference_values(critic: ValueHeadModel, prompts, responses):
    out = []
    for p, r in zip(prompts, responses):
        v = critic(torch.tensor([p + r]))[0]
        out.append([float(v[len(p) + t - 1]) for t in range(len(r))])
    return out


def to_padded(rows: list[list[float]], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_forward_logprobs_matches_unpadded_reference(layout):
    batch, prompts, responses = make_batch()
    model = tiny_actor()
    # a small token budget forces several micro-batches
    actor = TorchBackend("actor", model, OptimConfig(max_tokens_per_micro_batch=12), temperature=TEMPERATURE,
                         layout=layout)
    assert isinstance(actor, TrainBackend)
    lp = actor.forward_logprobs(batch)
    assert lp.shape == batch.response_mask.shape and lp.dtype == torch.float32
    ref = to_padded(reference_logprobs(model, prompts, responses, TEMPERATURE), batch.response_len)
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=0)
    assert (lp[batch.response_mask == 0] == 0).all()


def test_forward_values_alignment():
    batch, prompts, responses = make_batch(seed=1)
    critic = build_critic(tiny_actor(), OptimConfig(max_tokens_per_micro_batch=10))
    vals = critic.forward_values(batch)
    ref = to_padded(reference_values(critic.model, prompts, responses), batch.response_len)
    torch.testing.assert_close(vals, ref, atol=1e-5, rtol=0)
    assert (vals[batch.response_mask == 0] == 0).all() and vals.abs().sum() > 0
    with pytest.raises(ValueError):
        critic.forward_logprobs(batch)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padded_equals_packed(attn):
    batch, _, _ = make_batch(seed=2, rows=7)
    cfg = tiny_config()
    outs = {}
    for layout in ("padded", "packed"):
        actor = build_actor(cfg, attn_implementation=attn, layout=layout, temperature=TEMPERATURE, seed=3)
        critic = build_critic(cfg, attn_implementation=attn, layout=layout, seed=3)
        outs[layout] = (actor.forward_logprobs(batch), critic.forward_values(batch))
    for a, b in zip(outs["padded"], outs["packed"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------- training
SGD_LIKE = dict(lr=1.0, eps=100.0, grad_clip=0.0)  # eps >> |g|: AdamW steps by ~ g / eps, scale-sensitive


@pytest.mark.parametrize("loss_fn", [seq_loss, token_loss], ids=["seq", "token"])
@pytest.mark.parametrize("role", ["actor", "critic"])
def test_gradient_accumulation_matches_one_micro_batch(loss_fn, role):
    batch, _, _ = make_batch(seed=4, rows=8)
    build = build_actor if role == "actor" else build_critic
    runs = {}
    for budget in (10_000, 9):
        for layout in ("padded", "packed"):
            optim = OptimConfig(**SGD_LIKE, mini_batch_size=4, max_tokens_per_micro_batch=budget)
            backend = build(tiny_config(), optim, layout=layout, seed=5)
            metrics = backend.train_step(batch, loss_fn)
            runs[budget, layout] = (backend, metrics)
    ref_backend, ref_metrics = runs[10_000, "padded"]
    assert ref_metrics[f"{role}/num_micro_batches"] == 2 and ref_metrics[f"{role}/num_optimizer_steps"] == 2
    assert runs[9, "padded"][1][f"{role}/num_micro_batches"] >= 6
    for key, (backend, metrics) in runs.items():
        params_close(backend.model, ref_backend.model, atol=1e-6)
        for k in (f"{role}/loss", f"{role}/grad_norm"):
            assert metrics[k] == pytest.approx(ref_metrics[k], rel=1e-5), (key, k)


def test_loss_metric_is_the_mini_batch_loss():
    batch, _, _ = make_batch(seed=6)
    actor = build_actor(tiny_config(), OptimConfig(max_tokens_per_micro_batch=8), seed=1)
    expected = seq_loss(actor.forward_logprobs(batch), batch)[0].item()
    metrics = actor.train_step(batch, seq_loss)
    assert metrics["actor/loss"] == pytest.approx(expected, rel=1e-5)
    assert "actor/rows" in metrics  # loss_fn metrics come back namespaced


def test_lr_zero_is_frozen():
    batch, _, _ = make_batch(seed=7)
    critic = build_critic(tiny_config(), OptimConfig(lr=0.0), seed=2)
    before = copy.deepcopy(critic.model)
    metrics = critic.train_step(batch, token_loss)
    params_equal(critic.model, before)
    assert metrics["critic/num_optimizer_steps"] == 0 and metrics["critic/loss"] > 0
    assert "critic/grad_norm" not in metrics


def test_grad_clip_and_update_match_torch():
    batch, _, _ = make_batch(seed=8)
    optim = OptimConfig(lr=1e-3, weight_decay=0.01, grad_clip=1e-3)
    actor = build_actor(tiny_config(), optim, temperature=TEMPERATURE, seed=4)
    ref = copy.deepcopy(actor.model)
    # reference: one forward of the whole batch through HF, clip, AdamW
    logits = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 position_ids=batch.position_ids).logits.float() / TEMPERATURE
    p = batch.prompt_len
    lp = torch.log_softmax(logits[:, p - 1 : -1], -1).gather(-1, batch.response_ids[..., None])[..., 0]
    seq_loss(lp * batch.response_mask, batch)[0].backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), optim.grad_clip)
    opt = torch.optim.AdamW(ref.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    opt.step()
    metrics = actor.train_step(batch, seq_loss)
    assert ref_norm > 10 * optim.grad_clip  # clipping is active
    assert metrics["actor/grad_norm"] == pytest.approx(float(ref_norm), rel=1e-5)
    params_close(actor.model, ref, atol=1e-6)


def test_non_finite_grad_skips_step(caplog):
    batch, _, _ = make_batch(seed=9)
    actor = build_actor(tiny_config(), OptimConfig(lr=1e-3), seed=5)
    before = copy.deepcopy(actor.model)

    def nan_loss(out, mb):
        return seq_loss(out, mb)[0] * float("nan"), {}

    with caplog.at_level(logging.WARNING):
        metrics = actor.train_step(batch, nan_loss)
    assert metrics["actor/skipped_steps"] == 1 and metrics["actor/num_optimizer_steps"] == 0
    assert "non-finite" in caplog.text
    params_equal(actor.model, before)
    assert all(p.grad is None for p in actor.model.parameters())


def test_gradient_checkpointing_same_update():
    batch, _, _ = make_batch(seed=10)
    runs = [build_actor(tiny_config(), OptimConfig(**SGD_LIKE), gradient_checkpointing=gc, seed=6)
            for gc in (False, True)]
    for r in runs:
        r.train_step(batch, seq_loss)
    params_close(runs[0].model, runs[1].model, atol=1e-6)


@pytest.mark.parametrize("role", ["actor", "critic"])
def test_save_load_resumes_bit_exactly(tmp_path, role):
    b1, b2 = make_batch(seed=11)[0], make_batch(seed=12)[0]
    build = build_actor if role == "actor" else build_critic
    optim = OptimConfig(lr=1e-3, mini_batch_size=3, max_tokens_per_micro_batch=20)
    loss_fn = seq_loss if role == "actor" else token_loss
    a = build(tiny_config(), optim, seed=7)
    a.train_step(b1, loss_fn)
    a.save(tmp_path / "ckpt")
    a.train_step(b2, loss_fn)
    b = build(tiny_config(), optim, seed=8)  # other init: everything must come from the checkpoint
    b.load(tmp_path / "ckpt")
    b.train_step(b2, loss_fn)
    params_equal(a.model, b.model)
    with pytest.raises(FileNotFoundError):
        b.load(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------- export
def test_export_weights_load_into_fresh_model():
    batch, _, _ = make_batch(seed=13)
    actor = build_actor(tiny_config(), OptimConfig(lr=1e-2), seed=9)
    actor.train_step(batch, seq_loss)
    weights = dict(actor.export_weights())
    assert "lm_head.weight" not in weights
    assert all(t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad for t in weights.values())
    fresh = tiny_actor(seed=123)
    missing, unexpected = fresh.load_state_dict(weights, strict=False)
    assert unexpected == [] and missing == ["lm_head.weight"]  # tied to model.embed_tokens.weight
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(fresh(batch.input_ids).logits, actor.model(batch.input_ids).logits,
                                   atol=0, rtol=0)


def test_export_hf_round_trip(tmp_path):
    actor = build_actor(tiny_config(), seed=10)
    actor.export_hf(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    loaded = Qwen3ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, actor.model(ids).logits, atol=0, rtol=0)
    # the same directory rebuilds a backend
    batch, _, _ = make_batch(seed=14)
    again = build_actor(tmp_path / "hf")
    torch.testing.assert_close(again.forward_logprobs(batch), actor.forward_logprobs(batch), atol=0, rtol=0)


def test_critic_from_actor_and_pretrained_round_trip(tmp_path):
    actor = tiny_actor(seed=11)
    critic = ValueHeadModel.from_actor(actor)
    for name, t in actor.model.state_dict().items():
        assert torch.equal(critic.model.state_dict()[name], t)
    assert critic.model.embed_tokens.weight.data_ptr() != actor.model.embed_tokens.weight.data_ptr()
    assert critic.value_head.weight.abs().sum() > 0 and torch.equal(critic.value_head.bias, torch.zeros(1))
    names = {n for n, _ in build_critic(critic).export_weights()}
    assert {"value_head.weight", "value_head.bias", "model.embed_tokens.weight"} <= names

    with torch.no_grad():
        critic.value_head.bias.fill_(0.25)
    critic.save_pretrained(tmp_path / "critic")
    loaded = ValueHeadModel.from_pretrained(tmp_path / "critic").eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), critic.eval()(ids), atol=0, rtol=0)
    # an actor directory gives the trunk and a fresh head
    actor.save_pretrained(tmp_path / "actor")
    from_dir = build_critic(tmp_path / "actor")
    for name, t in actor.model.state_dict().items():
        assert torch.equal(from_dir.model.model.state_dict()[name], t)
    with pytest.raises(FileNotFoundError):
        ValueHeadModel.from_pretrained(tmp_path / "missing")
