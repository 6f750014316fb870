"""The host side of a step (scripts/bench_host_step.py measures it): the fast paths give what the
plain ones give, and no phase does Python work per token.

The cost-shape checks count Python line events (``sys.settrace``) rather than time: a phase that loops
over tokens in Python (a comprehension included) makes line events in proportion to the tokens, one
that hands them to C (numpy, torch, the Rust tokenizer, pickle) makes a number that depends on the rows
only. One ratio check on time (1M vs 8M tokens) guards against super-linear growth."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import random
import sys
import time

import pytest
import torch

from tempo_mega.algo import em_token_advantages
from tempo_mega.algo.correction import logprob_mismatch, truncated_is
from tempo_mega.batch import RolloutBatch
from tempo_mega.controller import TempoController
from tempo_mega.data.tokenizer import build_synthetic_tokenizer, decode_responses
from tempo_mega.rewards import compute_score, empo_rewards, grade_responses, pseudo_rewards, ttrl_rewards
from tempo_mega.rollout.base import Sample
from tempo_mega.rollout.samples import pack_samples, unpack_samples
from tempo_mega.rollout.sglang import SGLangRolloutEngine

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def make_samples(rows: int, tokens_per_row: int, seed: int = 0, ragged: bool = True) -> list[Sample]:
    rng = random.Random(seed)
    out = []
    for i in range(rows):
        n = rng.randint(0, tokens_per_row) if ragged else tokens_per_row
        if ragged and i == 0:
            n = tokens_per_row  # the widest row sets the width
        gen = torch.Generator().manual_seed(seed * 100_003 + i)
        out.append(Sample(prompt_index=i // 4, response_ids=torch.randint(3, 50_000, (n,), generator=gen).tolist(),
                          logprobs=(-5 * torch.rand(n, generator=gen, dtype=torch.float64)).tolist(),
                          finish_reason="length" if n == tokens_per_row else "stop", extra={"weight_version": "3"}))
    return out


def prompts_for(samples: list[Sample], seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 50_000) for _ in range(rng.randint(1, 12))] for _ in samples]


def reference_from_samples(prompt_ids, response_ids, *, pad_token_id, rollout_logprobs):
    """The padded layout, row by row in plain Python (the construction before the vectorized one)."""
    b = len(prompt_ids)
    p = max((len(x) for x in prompt_ids), default=0)
    resp = max((len(x) for x in response_ids), default=0)
    input_ids = torch.full((b, p + resp), pad_token_id, dtype=torch.long)
    attn = torch.zeros((b, p + resp), dtype=torch.long)
    rmask = torch.zeros((b, resp), dtype=torch.long)
    lp = torch.zeros((b, resp), dtype=torch.float32)
    for i, (pr, rs) in enumerate(zip(prompt_ids, response_ids)):
        for j, t in enumerate(pr):
            input_ids[i, p - len(pr) + j] = t
            attn[i, p - len(pr) + j] = 1
        for j, t in enumerate(rs):
            input_ids[i, p + j] = t
            attn[i, p + j] = 1
            rmask[i, j] = 1
            lp[i, j] = rollout_logprobs[i][j]
    return input_ids, attn, rmask, lp


def build(samples: list[Sample], prompts: list[list[int]]) -> RolloutBatch:
    return RolloutBatch.from_samples(prompts, [s.response_ids for s in samples], is_labeled=[True] * len(samples),
                                     group_ids=[s.prompt_index for s in samples], pad_token_id=0,
                                     rollout_logprobs=[s.logprobs for s in samples],
                                     meta={"truncated": [s.finish_reason == "length" for s in samples]})


def line_events(fn) -> int:
    """Python line events while ``fn()`` runs (every Python frame, comprehensions included)."""
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return tracer

    old = sys.gettrace()
    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(old)
    return count


# --------------------------------------------------------------------------------------------
# the fast paths equal the plain ones
# --------------------------------------------------------------------------------------------


def test_from_samples_equals_the_row_by_row_construction():
    samples = make_samples(9, 40, seed=3)
    samples[4] = Sample(prompt_index=1, response_ids=[], logprobs=[], finish_reason="stop")  # an empty response
    prompts = prompts_for(samples)
    batch = build(samples, prompts)
    ids, attn, rmask, lp = reference_from_samples(prompts, [s.response_ids for s in samples], pad_token_id=0,
                                                  rollout_logprobs=[s.logprobs for s in samples])
    assert torch.equal(batch.input_ids, ids)
    assert torch.equal(batch.attention_mask, attn)
    assert torch.equal(batch.response_mask, rmask)
    assert torch.equal(batch.rollout_logprobs, lp)
    assert batch.input_ids.dtype == torch.long and batch.attention_mask.dtype == torch.long


def test_from_samples_errors_name_the_sample():
    samples = make_samples(3, 5, ragged=False)
    with pytest.raises(ValueError, match="sample 1 has an empty prompt"):
        build(samples, [[5], [], [6]])
    bad = list(samples)
    bad[2] = Sample(prompt_index=0, response_ids=[1, 2, 3], logprobs=[-1.0], finish_reason="stop")
    with pytest.raises(ValueError, match="sample 2 has 3 response tokens but 1 log-probs"):
        build(bad, prompts_for(bad))


def test_pack_unpack_round_trip_and_the_same_batch():
    samples = make_samples(7, 30, seed=5)
    tensors, rest = pack_samples(samples)
    assert tensors[2].dtype == torch.int32 and tensors[3].dtype == torch.float32
    back = unpack_samples(tensors, rest)
    assert [s.prompt_index for s in back] == [s.prompt_index for s in samples]
    assert [s.response_ids for s in back] == [s.response_ids for s in samples]
    assert [s.finish_reason for s in back] == [s.finish_reason for s in samples]
    assert [s.extra for s in back] == [s.extra for s in samples]
    for a, b in zip(back, samples):  # float32 on the wire: the precision the batch keeps anyway
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-6)
    prompts = prompts_for(samples)
    x, y = build(back, prompts), build(samples, prompts)
    assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.rollout_logprobs, y.rollout_logprobs)


def test_pack_unpack_carries_routed_experts():
    """A mixture of experts' samples (routing replay) keep their routed experts across the pack: every
    rank of a multi-rank trainer replays the sampler's routes, not rank 0 alone."""
    samples = make_samples(4, 9, seed=2)
    g = torch.Generator().manual_seed(0)
    for s in samples:
        s.routed_experts = torch.randint(0, 128, (3 + len(s.response_ids), 2, 4), generator=g).to(torch.uint8)
    tensors, rest = pack_samples(samples)
    assert len(tensors) == 5 and tensors[4].dtype == torch.uint8
    back = unpack_samples(tensors, rest)
    for a, b in zip(back, samples):
        assert a.routed_experts.dtype == torch.uint8 and torch.equal(a.routed_experts, b.routed_experts)
    samples[1].routed_experts = None
    with pytest.raises(ValueError, match="some samples carry routed experts and some do not"):
        pack_samples(samples)
    assert all(s.routed_experts is None for s in unpack_samples(*pack_samples(make_samples(2, 3))))


def test_pack_samples_rejects_a_log_prob_count_mismatch():
    s = Sample(prompt_index=3, response_ids=[1, 2], logprobs=[-0.5], finish_reason="stop")
    with pytest.raises(ValueError, match="prompt 3 has 2 response tokens but 1 log-probs"):
        pack_samples([s])


_BROADCAST_WORKER = """
import dataclasses, json, os, random, sys
import torch
import torch.distributed as dist
from tempo_mega.rollout.base import Sample
from tempo_mega.rollout.samples import broadcast_samples

rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
rng = random.Random(11)
mine = [Sample(prompt_index=i, response_ids=[rng.randrange(50000) for _ in range(n)],
               logprobs=[-rng.random() for _ in range(n)], finish_reason="stop", extra={"v": i})
        for i, n in enumerate([25, 0, 7, 25])]
got = broadcast_samples(mine if rank == 0 else None)
# a mixture of experts' samples: their routed experts travel too
mine = [dataclasses.replace(s, routed_experts=torch.arange(i, i + 3 * (len(s.response_ids) + 2)).view(-1, 3, 1)
                            .to(torch.uint8)) for i, s in enumerate(mine)]
moe = broadcast_samples(mine if rank == 0 else None)
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump([[s.prompt_index, s.response_ids, s.logprobs, s.finish_reason, s.extra] for s in got]
              + [[m.routed_experts.tolist(), str(m.routed_experts.dtype), g.routed_experts] for m, g in zip(moe, got)], f)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_broadcast_samples_over_gloo(tmp_path):
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    script = tmp_path / "worker.py"
    script.write_text(_BROADCAST_WORKER)
    procs = [subprocess.Popen([sys.executable, "-P", str(script), str(r), port, str(tmp_path)]) for r in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    r0, e0, r1, e1 = r0[:4], r0[4:], r1[:4], r1[4:]
    assert len(r0) == 4 and r0[1][1] == []
    assert [x[:2] + x[3:] for x in r0] == [x[:2] + x[3:] for x in r1]
    assert e0 == e1 and [e[1:] for e in e1] == [["torch.uint8", None]] * 4
    assert [len(e[0]) for e in e1] == [27, 2, 9, 27]
    for a, b in zip(r0, r1):
        assert b[2] == pytest.approx(a[2], abs=1e-6)


def test_decode_responses_equals_decode():
    tok = build_synthetic_tokenizer()
    batch = [tok.encode(t) for t in ["What is 2+3? \\boxed{5}", "", "<|im_start|>x<|im_end|> \\frac{1}{2}", "héllo"]]
    assert decode_responses(tok, batch) == [tok.decode(x, skip_special_tokens=True) for x in batch]


RESPONSES = [
    ("so \\boxed{\\frac{1}{2}}", "0.5"), ("\\boxed{0.5}", "\\frac12"), ("\\boxed{3}", "4"), ("no box", "4"),
    ("\\boxed{(x+1)^2}", "x^2+2x+1"), ("\\boxed{10^{10^{10}}}", "5"), ("\\boxed{7}", 7), ("\\boxed{}", "1"),
    ("\\boxed{2\\sqrt{3}}", "\\sqrt{12}"), ("\\boxed{\\frac{1}{2}}", "0.5"), ("\\boxed{(1,2]}", "(1, 2]"),
]


@pytest.mark.parametrize("workers", [1, 2])
def test_grade_responses_equals_compute_score(workers):
    texts, golds = zip(*RESPONSES)
    want = [compute_score(t, g) > 0 for t, g in RESPONSES]
    assert grade_responses(list(texts), list(golds), workers=workers) == want
    assert want == [True, True, False, False, True, False, True, False, True, True, True]


GROUPS = [
    ["\\boxed{\\frac{1}{2}}", "\\boxed{0.5}", "\\boxed{3}", "none", "\\boxed{1/2}", "\\boxed{3.0}", "\\boxed{4}", ""],
    ["\\boxed{(x+1)^2}", "\\boxed{x^2+2x+1}", "\\boxed{x^2+1}", "\\boxed{7}"],
    ["x", "y"],
]


@pytest.mark.parametrize("workers", [1, 2])
def test_pseudo_rewards_equal_the_per_group_rewards(workers):
    assert pseudo_rewards("ttrl", GROUPS, positive=1.0, negative=-1.0, workers=workers) == \
        [ttrl_rewards(g, positive=1.0, negative=-1.0)[0] for g in GROUPS]
    assert pseudo_rewards("empo", GROUPS, workers=workers) == [empo_rewards(g)[0] for g in GROUPS]
    with pytest.raises(ValueError, match="mode must be"):
        pseudo_rewards("tempo", GROUPS)


# --------------------------------------------------------------------------------------------
# the costs' shape
# --------------------------------------------------------------------------------------------

ROWS = 16


def _phases(tokens_per_row: int):
    """Each host phase of a step at ROWS rows of ``tokens_per_row`` response tokens, as a closure."""
    samples = make_samples(ROWS, tokens_per_row, seed=7, ragged=False)
    prompts = prompts_for(samples)
    answers = [{"meta_info": {"output_token_logprobs": [[lp, t, None] for lp, t in zip(s.logprobs, s.response_ids)],
                              "finish_reason": {"type": "length"}}} for s in samples]
    tok = build_synthetic_tokenizer()
    text_ids = [tok.encode("Let x be 3. " * (tokens_per_row // 12) + "\\boxed{\\frac{1}{2}}") for _ in range(ROWS)]
    texts = decode_responses(tok, text_ids)
    packed = pack_samples(samples)
    batch = build(samples, prompts)
    batch.old_logprobs = batch.rollout_logprobs + 0.01
    batch.values = torch.zeros_like(batch.rollout_logprobs)

    def advantages():
        logprob_mismatch(batch.rollout_logprobs, batch.old_logprobs, batch.response_mask)
        batch.advantages, batch.returns = em_token_advantages(batch.values, batch.scores, batch.response_mask,
                                                              batch.is_labeled)
        truncated_is(batch.advantages, batch.old_logprobs, batch.rollout_logprobs, batch.response_mask, 2.0)
        TempoController.rollout_metrics(batch)

    return {
        "parse": lambda: [SGLangRolloutEngine._parse_output(a, i) for i, a in enumerate(answers)],
        "decode": lambda: decode_responses(tok, text_ids),
        "grade": lambda: grade_responses(texts, ["0.5"] * ROWS, workers=1),
        "batch": lambda: build(samples, prompts),
        "filter": lambda: RolloutBatch.cat([batch, batch]).select(torch.arange(ROWS)).trim(),
        "pack_samples": lambda: pack_samples(samples),
        "unpack_samples": lambda: unpack_samples(*packed),
        "to_packed": lambda: [mb.to_packed() for mb in batch.split_by_tokens(4 * tokens_per_row)],
        "advantages": advantages,
    }


def test_no_phase_does_python_work_per_token():
    small, large = _phases(250), _phases(2000)
    for name in small:
        small[name]()  # imports and caches out of the count
        large[name]()
        n_small, n_large = line_events(small[name]), line_events(large[name])
        # 8x the tokens, the same rows: per-token Python work would make ~8x the line events
        assert n_large <= 1.25 * n_small + 50, f"{name}: {n_small} -> {n_large} Python line events for 8x the tokens"


def _best_of(fn, repeat: int = 3) -> float:
    """The fastest of ``repeat`` runs, each after a collection and with the cyclic GC paused: late in a
    long test session a collection of everything the earlier tests left can land inside one run."""
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        gc.disable()
        try:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        finally:
            gc.enable()
    return best


@contextlib.contextmanager
def _heap_allocations():
    """glibc's malloc serving buffers up to 1 GiB from its heap, without trimming it, for the block.
    By default a freed buffer over 32 MB goes back to the kernel, so every 8M-token call pays fresh
    page faults while 1M-token buffers are reused: the 1M->8M ratio of a phase then swings from 8x to
    18x with the allocator state earlier tests left. Both sizes taken from the heap, the ratio measures
    the phase's own work. Elsewhere than glibc nothing is changed. Afterwards a fixed 32 MB mmap and
    64 MB trim threshold are set (glibc's dynamic default cannot be restored)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        yield
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 1 << 30)
    mallopt(m_trim_threshold, 1 << 31)
    try:
        yield
    finally:
        mallopt(m_mmap_threshold, 32 << 20)
        mallopt(m_trim_threshold, 64 << 20)


def test_token_phases_grow_linearly_from_1m_to_8m_tokens():
    """Ratio, not a timed bound: 8x the tokens may cost at most 16x the time (linear is 8x; the
    slack is for caches and a noisy machine). Rows stay 64: long responses, as at 16K."""
    rows = 64
    ratios = {}
    with _heap_allocations():
        for name, make in {
            "batch": lambda n: (lambda s, p: lambda: build(s, p))(*(lambda s: (s, prompts_for(s)))(make_samples(rows, n, ragged=False))),
            "pack_samples": lambda n: (lambda s: lambda: pack_samples(s))(make_samples(rows, n, ragged=False)),
            "unpack_samples": lambda n: (lambda p: lambda: unpack_samples(*p))(pack_samples(make_samples(rows, n, ragged=False))),
        }.items():
            t_1m = _best_of(make(1_000_000 // rows), repeat=5)
            t_8m = _best_of(make(8_000_000 // rows), repeat=3)
            ratios[name] = t_8m / t_1m
    assert all(r <= 16 for r in ratios.values()), ratios
