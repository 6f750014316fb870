"""HFRolloutEngine against references computed another way: one plain full forward per sequence (no
cache, no padding, no batching) for log-probs and greedy decoding, hand-made distributions for top-p."""

from __future__ import annotations

import copy

import pytest
import torch
from support.models import tiny_qwen3 as support_tiny_qwen3
from transformers import Qwen3ForCausalLM

from tempo_mega.rollout.base import RolloutEngine, SamplingParams
from tempo_mega.rollout.hf import HFRolloutEngine, filter_logits, sample_from_logits

VOCAB = 128
PAD = 0
# different lengths, so the batch is left-padded
PROMPTS = [[5, 17, 9], [3, 44, 71, 12, 8, 99, 23, 61, 2], [120, 7, 7, 31, 64]]


def tiny_qwen3(seed: int = 0, tie: bool = False) -> Qwen3ForCausalLM:
    # peakier init than the default 0.02, so greedy margins are not razor thin
    return support_tiny_qwen3(seed, vocab_size=VOCAB, intermediate_size=128, max_position_embeddings=256,
                              initializer_range=0.2, tie_word_embeddings=tie, pad_token_id=PAD)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model() -> Qwen3ForCausalLM:
    return tiny_qwen3(0)


def make_engine(model: Qwen3ForCausalLM, **kw) -> HFRolloutEngine:
    return HFRolloutEngine(copy.deepcopy(model), pad_token_id=PAD, **kw)


@torch.inference_mode()
def teacher_forced_logprobs(
    model, prompt: list[int], response: list[int], temperature: float
) -> torch.Tensor:
    """[len(response)] log-probs from one full forward over prompt + response."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    return logp[pos, torch.tensor(response)]


@torch.inference_mode()
def greedy_reference(model, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def check_sample_invariants(samples, sampling: SamplingParams) -> None:
    stops = set(sampling.stop_token_ids)
    for s in samples:
        assert len(s.response_ids) == len(s.logprobs) >= 1
        assert len(s.response_ids) <= sampling.max_response_tokens
        assert not stops.intersection(s.response_ids[:-1])
        if s.finish_reason == "stop":
            assert s.response_ids[-1] in stops
        else:
            assert s.finish_reason == "length"
            assert len(s.response_ids) == sampling.max_response_tokens
            assert s.response_ids[-1] not in stops


# ---------------------------------------------------------------------------- log-probs


@pytest.mark.parametrize(
    "stop_token_ids, top_k, top_p",
    [((), -1, 1.0), (tuple(range(10, 30)), -1, 1.0), (tuple(range(10, 30)), 20, 0.9)],
    ids=["no-stop", "stops", "stops-topk-topp"],
)
def test_logprobs_match_teacher_forcing(model, stop_token_ids, top_k, top_p):
    # Stop tokens make rows finish at different steps, so this also checks the cache after rows leave the
    # batch; with top-k/top-p on, log-probs must still be those of the untruncated distribution.
    sampling = SamplingParams(
        temperature=0.7,
        top_k=top_k,
        top_p=top_p,
        max_response_tokens=12,
        stop_token_ids=stop_token_ids,
        seed=3,
    )
    samples, metrics = make_engine(model).generate(PROMPTS, n=3, sampling=sampling)
    assert len(samples) == 9
    check_sample_invariants(samples, sampling)
    lens = [len(s.response_ids) for s in samples]
    assert metrics["rollout/response_len_max"] == max(lens)
    assert metrics["rollout/response_len_mean"] == sum(lens) / 9
    assert metrics["rollout/truncation_rate"] == sum(s.finish_reason == "length" for s in samples) / 9
    assert metrics["rollout/tokens_per_s"] == sum(lens) / metrics["timing/rollout_s"]
    if stop_token_ids:
        assert {s.finish_reason for s in samples} == {"stop", "length"}
        assert len({len(s.response_ids) for s in samples}) > 2
    for s in samples:
        ref = teacher_forced_logprobs(model, PROMPTS[s.prompt_index], s.response_ids, sampling.temperature)
        torch.testing.assert_close(torch.tensor(s.logprobs), ref, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- seeds and chunking


def test_seed_determinism(model):
    engine = make_engine(model)

    def run(seed):
        sampling = SamplingParams(temperature=1.0, max_response_tokens=10, seed=seed)
        return [(s.response_ids, s.logprobs) for s in engine.generate(PROMPTS, n=2, sampling=sampling)[0]]

    assert run(7) == run(7)
    assert run(7) != run(8)
    assert run(None) != run(None)


def test_chunking_and_batch_composition_do_not_change_samples(model):
    sampling = SamplingParams(
        temperature=1.0, max_response_tokens=10, stop_token_ids=tuple(range(10, 30)), seed=11
    )
    big, _ = make_engine(model, max_batch_size=64).generate(PROMPTS, n=3, sampling=sampling)
    for max_batch_size in (1, 4):
        chunked, _ = make_engine(model, max_batch_size=max_batch_size).generate(PROMPTS, n=3, sampling=sampling)
        assert [s.response_ids for s in chunked] == [s.response_ids for s in big]
        assert [s.finish_reason for s in chunked] == [s.finish_reason for s in big]
        for a, b in zip(chunked, big):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    # a sample's stream depends on its index in the request: the first prompt alone gives the same samples
    alone, _ = make_engine(model).generate(PROMPTS[:1], n=3, sampling=sampling)
    assert [s.response_ids for s in alone] == [s.response_ids for s in big[:3]]


# ---------------------------------------------------------------------------- greedy, ordering, stop


def test_top_k_1_is_greedy_and_prompt_major(model):
    sampling = SamplingParams(temperature=0.7, top_k=1, max_response_tokens=8, seed=0)
    samples, _ = make_engine(model).generate(PROMPTS, n=2, sampling=sampling)
    assert [s.prompt_index for s in samples] == [0, 0, 1, 1, 2, 2]
    refs = [greedy_reference(model, p, 8) for p in PROMPTS]
    assert len({tuple(r) for r in refs}) == 3  # the prompts are told apart, so ordering is tested
    for k, s in enumerate(samples):
        assert s.response_ids == refs[k // 2]
        assert s.finish_reason == "length"


def test_stop_token_ends_response(model):
    steps = 8
    refs = [greedy_reference(model, p, steps) for p in PROMPTS]
    stop = refs[1][3]  # greedy produces it at step 3 for prompt 1 (maybe earlier too)
    sampling = SamplingParams(temperature=1.0, top_k=1, max_response_tokens=steps, stop_token_ids=(stop,))
    samples, _ = make_engine(model).generate(PROMPTS, n=1, sampling=sampling)
    check_sample_invariants(samples, sampling)
    for s, ref in zip(samples, refs):
        if stop in ref:
            cut = ref.index(stop) + 1
            assert (s.response_ids, s.finish_reason) == (ref[:cut], "stop")
        else:
            assert (s.response_ids, s.finish_reason) == (ref, "length")
    assert samples[1].finish_reason == "stop" and samples[1].response_ids[-1] == stop
    # the first greedy token as the stop: a one-token response
    first, _ = make_engine(model).generate(
        PROMPTS[:1],
        n=1,
        sampling=SamplingParams(top_k=1, max_response_tokens=5, stop_token_ids=(refs[0][0],)),
    )
    assert (first[0].response_ids, first[0].finish_reason) == ([refs[0][0]], "stop")


def test_max_response_tokens(model):
    sampling = SamplingParams(max_response_tokens=4, seed=1)
    samples, _ = make_engine(model).generate(PROMPTS, n=2, sampling=sampling)
    assert all(len(s.response_ids) == 4 and s.finish_reason == "length" for s in samples)
    one, _ = make_engine(model).generate(PROMPTS, n=1, sampling=SamplingParams(max_response_tokens=1, seed=1))
    assert all(len(s.response_ids) == 1 for s in one)


# ---------------------------------------------------------------------------- top-k / top-p


def test_filter_logits_hand_made():
    logits = torch.tensor([[0.5, 0.25, 0.15, 0.1]]).log()

    def kept(**kw) -> list[int]:
        return torch.isfinite(filter_logits(logits, **kw))[0].nonzero().flatten().tolist()

    assert kept(top_p=0.5) == [0]
    assert kept(top_p=0.7) == [0, 1]
    assert kept(top_p=0.75) == [0, 1]  # {0, 1} already holds 0.75
    assert kept(top_p=0.76) == [0, 1, 2]
    assert kept(top_p=1.0) == [0, 1, 2, 3]
    assert kept(top_p=0.01) == [0]  # the most likely token always stays
    assert kept(top_k=2) == [0, 1]
    assert kept(top_k=10) == [0, 1, 2, 3]
    # top-k first, then top-p on the renormalized survivors: {0.5, 0.25, 0.15} -> 0.5/0.9 < 0.6 <= 0.75/0.9
    assert kept(top_k=3, top_p=0.6) == [0, 1]
    # order in the vocabulary does not matter, ties with the k-th value are kept
    shuffled = torch.tensor([[0.1, 0.15, 0.5, 0.25]]).log()
    assert torch.isfinite(filter_logits(shuffled, top_p=0.7))[0].tolist() == [False, False, True, True]
    tied = torch.tensor([[1.0, 3.0, 2.0, 2.0]])
    assert torch.isfinite(filter_logits(tied, top_k=2))[0].tolist() == [False, True, True, True]


def test_sampling_never_leaves_the_nucleus_and_follows_it():
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    rows = 20000
    logits = probs.log().expand(rows, -1)
    sampling = SamplingParams(temperature=1.0, top_p=0.8)  # nucleus {1, 3, 4}: 0.4 + 0.3 + 0.15 = 0.85
    gen = torch.Generator().manual_seed(0)
    tokens, logprobs = sample_from_logits(
        logits, sampling, torch.rand(rows, generator=gen, dtype=torch.float64)
    )
    counts = torch.bincount(tokens, minlength=5).double() / rows
    assert counts[[0, 2]].sum() == 0
    torch.testing.assert_close(
        counts[[1, 3, 4]], torch.tensor([0.4, 0.3, 0.15], dtype=torch.float64) / 0.85, atol=0.015, rtol=0
    )
    # log-probs are those of the untruncated distribution
    torch.testing.assert_close(logprobs, probs.log()[tokens])


def test_engine_samples_stay_in_nucleus(model):
    sampling = SamplingParams(temperature=0.7, top_p=0.3, max_response_tokens=10, seed=5)
    samples, _ = make_engine(model).generate(PROMPTS, n=2, sampling=sampling)
    with torch.inference_mode():
        for s in samples:
            p = PROMPTS[s.prompt_index]
            logits = (
                model(input_ids=torch.tensor([p + s.response_ids])).logits[0].float() / sampling.temperature
            )
            allowed = torch.isfinite(filter_logits(logits, top_p=sampling.top_p))
            pos = torch.arange(len(p) - 1, len(p) + len(s.response_ids) - 1)
            assert allowed[pos, torch.tensor(s.response_ids)].all()
            assert allowed[pos].sum(-1).float().mean() < VOCAB / 2  # the filter does cut something here


# ---------------------------------------------------------------------------- weights and lifecycle


def test_update_weights_switches_the_model(model):
    other = tiny_qwen3(seed=1)
    engine = make_engine(model)
    sampling = SamplingParams(top_k=1, max_response_tokens=6)
    before = [s.response_ids for s in engine.generate(PROMPTS, n=1, sampling=sampling)[0]]
    assert before == [greedy_reference(model, p, 6) for p in PROMPTS]
    # streamed (a generator), in another dtype: cast to the model's
    loaded = engine.update_weights((k, v.double()) for k, v in other.state_dict().items())
    assert loaded == len(other.state_dict())
    assert all(p.dtype == torch.float32 for p in engine.model.parameters())
    after = [s.response_ids for s in engine.generate(PROMPTS, n=1, sampling=sampling)[0]]
    refs = [greedy_reference(other, p, 6) for p in PROMPTS]
    assert after == refs and after != before
    s = engine.generate(
        PROMPTS[:1], n=1, sampling=SamplingParams(temperature=0.7, max_response_tokens=6, seed=0)
    )[0][0]
    torch.testing.assert_close(
        torch.tensor(s.logprobs),
        teacher_forced_logprobs(other, PROMPTS[0], s.response_ids, 0.7),
        atol=1e-5,
        rtol=0,
    )


def test_update_weights_rejects_unknown_names_and_shapes(model):
    engine = make_engine(model)
    with pytest.raises(ValueError, match="model.layers.9.mlp.up_proj.weight"):
        engine.update_weights([("model.layers.9.mlp.up_proj.weight", torch.zeros(128, 64))])
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*\(3,\)"):
        engine.update_weights([("model.norm.weight", torch.zeros(3))])


def test_update_weights_tied_embeddings():
    src, dst = tiny_qwen3(seed=2, tie=True), tiny_qwen3(seed=3, tie=True)
    engine = HFRolloutEngine(dst, pad_token_id=PAD)
    # a trainer may leave the tied lm_head.weight out of what it sends
    engine.update_weights((k, v) for k, v in src.state_dict().items() if k != "lm_head.weight")
    assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight
    torch.testing.assert_close(engine.model.lm_head.weight, src.model.embed_tokens.weight)
    sampling = SamplingParams(top_k=1, max_response_tokens=5)
    got = [s.response_ids for s in engine.generate(PROMPTS, n=1, sampling=sampling)[0]]
    assert got == [greedy_reference(src, p, 5) for p in PROMPTS]
    assert engine.update_weights(src.state_dict().items()) == len(src.state_dict())  # or sends both


def test_lifecycle_and_validation(model):
    engine = make_engine(model)
    assert isinstance(engine, RolloutEngine)
    sampling = SamplingParams(max_response_tokens=3, seed=0)
    engine.release_memory()
    with pytest.raises(RuntimeError, match="resume_memory"):
        engine.generate(PROMPTS, n=1, sampling=sampling)
    engine.resume_memory()
    assert len(engine.generate(PROMPTS, n=1, sampling=sampling)[0]) == 3
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1, 2], []], n=1, sampling=sampling)
    with pytest.raises(ValueError, match="prompt 0 has a token id outside"):
        engine.generate([[1, VOCAB]], n=1, sampling=sampling)
    with pytest.raises(ValueError, match="n must be"):
        engine.generate(PROMPTS, n=0, sampling=sampling)
    engine.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        engine.generate(PROMPTS, n=1, sampling=sampling)


def test_bfloat16_engine_runs(model):
    engine = make_engine(model, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in engine.model.parameters())
    sampling = SamplingParams(temperature=0.7, max_response_tokens=5, seed=0)
    samples, _ = engine.generate(PROMPTS, n=2, sampling=sampling)
    check_sample_invariants(samples, sampling)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    for s in samples:  # batched bf16 differs from unbatched bf16 only by rounding
        ref = teacher_forced_logprobs(bf16, PROMPTS[s.prompt_index], s.response_ids, 0.7)
        torch.testing.assert_close(torch.tensor(s.logprobs), ref, atol=0.1, rtol=0)
