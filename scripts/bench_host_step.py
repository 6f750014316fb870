"""Benchmark the host side of one paper-scale TEMPO step (``experiment=qwen3_8b_tempo``): everything
rank 0 (and every rank) does on the CPU between the sampler's output and the GPU passes, with the
product's own code for each phase.

Shape: ``algo.labeled_prompts_per_step + algo.unlabeled_prompts_per_step`` prompts x
``algo.num_samples_per_prompt`` samples (128 + 128 x 8 = 2,048 responses), read from the preset's config
(``--experiment``, Hydra overrides after ``--``). Response lengths are drawn like reasoning traces: a
log-normal body (median ~4.5K tokens) with a long tail that ``rollout.max_response_tokens`` (16,384)
truncates (~10% of responses: no final answer). Answers are realistic ``\\boxed{}`` contents (integers,
fractions written three ways, decimals, radicals, intervals, tuples, expressions, units, percentages)
plus pathological ones (``10^{10^{10}}``, 20 levels of nesting, a 5,000-character formula, an empty
box, an unclosed box). The text is built from a pool of reasoning sentences, encoded once with a
byte-level BPE tokenizer trained here on that pool (32K vocabulary, ~4 characters per token like
Qwen3's; ``--tokenizer PATH`` uses a real one instead), so decoding does real BPE work.

Phases, one row each (seconds, items/s, peak RSS of the process during the phase):

  parse       ``SGLangRolloutEngine._parse_output`` on the server's JSON answers (ids and log-probs)
  decode      token ids -> text, as the controller does (``PromptSource.decode_batch``)
  grade       math-verify grading of every labeled response (``grade_responses``)
  ttrl/empo   answer clustering of every unlabeled group (``ttrl_rewards`` / ``empo_rewards`` through
              ``pseudo_rewards``); TEMPO itself needs neither, the baselines do
  filter      ``filter_groups`` on the per-row scores and the kept rows (``SampledPart``)
  batch       ``RolloutBatch.from_samples`` of the kept rows (the padded tensors, built once);
              ``--baseline`` has one ``filter+batch`` row: a batch per part, ``cat``, ``select``, ``trim``
  transport   rank 0's samples to the other ranks: serialize + deserialize, as pickled objects
              (``broadcast_object_list``'s cost) and as flat tensors (``pack_samples``), for this step's
              samples (in the total) and at the worst-case size, every response at max length:
              2,048 x 16,384 = 33.5M tokens (``@33.6M`` rows, beside the total)
  pack        ``split_by_tokens`` into micro-batches + ``to_packed`` of each
  advantages  ``em_token_advantages`` + truncated IS + the step's rollout metrics

``--workers N`` sets the grading/clustering pool and the decoder's threads (torch runs one intra-op
thread, as torchrun's trainer processes do) (``--workers 1,2`` runs each in a
fresh process; default: 1 and all cores). The total is the sum of the phases a TEMPO step runs (parse,
decode, grade, batch, filter, transport (the chosen one), pack, advantages); ttrl/empo rows are shown
beside it. ``--steps N`` (default 2) runs N steps in the process, each on new samples, and reports the
last (a running trainer's step, with ``trainer.host_memory``'s setting, ``--host-memory``); the first
step's total is a row beside it. Nothing is asserted: this prints what it measured.

    python scripts/bench_host_step.py                        # qwen3_8b_tempo, workers 1 and all cores
    python scripts/bench_host_step.py --scale 0.25 --workers 2
    python scripts/bench_host_step.py --markdown docs/bench_host_step.md
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import pickle
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

# --------------------------------------------------------------------------------------------
# Peak RSS sampling
# --------------------------------------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: the high-water mark is the best we have
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRSS:
    """Samples this process's RSS every 5 ms while active; ``peak`` is the largest seen."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


@dataclass
class Row:
    phase: str
    seconds: float
    items: int
    unit: str
    peak_rss_gib: float
    in_total: bool = True

    @property
    def per_s(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else float("inf")


def timed(rows: list[Row], phase: str, items: int, unit: str, fn, in_total: bool = True):
    gc.collect()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
    rows.append(Row(phase, dt, items, unit, mem.peak / 2**30, in_total))
    return out


# --------------------------------------------------------------------------------------------
# Synthetic rollouts of the preset's sizes
# --------------------------------------------------------------------------------------------

_SENTENCES = [
    "Let me think about this step by step.",
    "First, we note that the expression can be rewritten as a sum of two squares.",
    "Substituting x = {a} into the equation gives {b}.",
    "Wait, that does not look right; let me recompute the discriminant.",
    "The discriminant is b^2 - 4ac = {a}^2 - 4 \\cdot {b} \\cdot {c}.",
    "So the number of integer solutions is {a}.",
    "Hmm, let me double-check by plugging the values back in.",
    "By the triangle inequality, the sum of any two sides exceeds the third.",
    "Therefore $\\frac{{{a}}}{{{b}}} + \\frac{{{c}}}{{{a}}}$ simplifies to a single fraction.",
    "Alternatively, we can count the complement: there are {a} ways in total.",
    "Using modular arithmetic, $ {a} \\equiv {b} \\pmod{{{c}}} $.",
    "Let $f(x) = x^{a} + {b}x + {c}$; then $f'(x) = {a}x^{{{b}}} + {c}$.",
    "Now consider the case where n is even, say n = 2k.",
    "The area of the triangle is $\\tfrac12 \\cdot {a} \\cdot {b} = {c}$.",
    "I made an arithmetic slip earlier: {a} times {b} is {c}, not {a}{b}.",
    "Combining the two cases, the answer follows.",
    "Since the sequence is geometric with ratio {a}, its sum is $\\frac{{{b}}}{{1-{a}}}$.",
    "We need $\\sqrt{{{a}}}$ to be rational, which forces {a} to be a perfect square.",
    "Checking small values: n = 1 gives {a}, n = 2 gives {b}, n = 3 gives {c}.",
    "This matches the pattern we conjectured, so the induction step goes through.",
]

def answer_family(rng: random.Random) -> tuple[str, list[str], list[str]]:
    """(gold, equivalent forms, wrong answers) with random numbers, so that golds differ between
    prompts as in a real dataset (a cache shared across prompts would otherwise look too good)."""
    k = rng.randint(2, 2000)
    p, q = rng.randint(1, 30), rng.randint(2, 40)
    a, b = rng.randint(2, 9), rng.choice([2, 3, 5, 6, 7])
    kind = rng.choices(["int", "frac", "sqrt", "interval", "tuple", "poly", "deg", "unit", "pct", "pow", "pi"],
                       weights=[40, 15, 6, 4, 4, 5, 4, 4, 4, 4, 3])[0]
    if kind == "int":
        return str(k), [str(k), f"{k}.0", f"0{k}"], [str(k + 1), str(2 * k), str(k - 1)]
    if kind == "frac":
        dec = [f"{p / q:g}"] if q in (2, 4, 5, 8, 10, 16, 20, 25) else []
        return (f"\\frac{{{p}}}{{{q}}}", [f"\\frac{{{p}}}{{{q}}}", f"\\dfrac{{{p}}}{{{q}}}", f"{p}/{q}", *dec],
                [f"\\frac{{{q}}}{{{p}}}", f"\\frac{{{p}}}{{{q + 1}}}", str(p)])
    if kind == "sqrt":
        return (f"{a}\\sqrt{{{b}}}", [f"{a}\\sqrt{{{b}}}", f"\\sqrt{{{a * a * b}}}", f"{a}\\sqrt{b}"],
                [f"{b}\\sqrt{{{a}}}", f"\\sqrt{{{a * b}}}"])
    if kind == "interval":
        return f"({a}, {a + b}]", [f"({a}, {a + b}]", f"({a},{a + b}]"], [f"[{a}, {a + b}]", f"({a}, {a + b})"]
    if kind == "tuple":
        return f"({a}, -{b})", [f"({a}, -{b})", f"({a},-{b})"], [f"(-{b}, {a})", f"({a}, {b})"]
    if kind == "poly":
        return (f"x^2 + {2 * a}x + {a * a}", [f"x^2 + {2 * a}x + {a * a}", f"(x+{a})^2", f"{a * a} + {2 * a}x + x^2"],
                [f"x^2 + {a * a}", f"(x-{a})^2"])
    if kind == "deg":
        return f"{k % 360}^\\circ", [f"{k % 360}^\\circ", str(k % 360)], [f"{(k + 30) % 360}^\\circ"]
    if kind == "unit":
        return f"{k}\\text{{ cm}}", [f"{k}\\text{{ cm}}", str(k)], [f"{k + 2}\\text{{ cm}}"]
    if kind == "pct":
        return f"{k % 100}\\%", [f"{k % 100}\\%", str(k % 100)], [f"{(k + 50) % 100}\\%"]
    if kind == "pow":
        return str(2 ** (a + 3)), [str(2 ** (a + 3)), f"2^{{{a + 3}}}"], [str(2 ** (a + 3) - 1), f"2^{{{a + 4}}}"]
    return f"{a}\\pi", [f"{a}\\pi", f"{a} \\pi"], [f"{a + 1}\\pi", f"\\frac{{\\pi}}{{{a}}}"]


_PATHOLOGICAL = [
    "10^{10^{10}}",
    "{" * 20 + "1" + "}" * 20,
    "+".join(f"x_{{{i}}}^{{{i % 7}}}" for i in range(600)),  # ~5,000 characters
    "",  # an empty box
]

_UNCLOSED = "\\boxed{\\frac{1}{"  # a response cut inside its box


def response_length(rng: random.Random, max_len: int) -> int:
    """Log-normal around 4.5K tokens (sigma 0.75: a long tail); the sampler's cap truncates the tail."""
    return max(16, min(max_len, int(rng.lognormvariate(math.log(4500), 0.75))))


def group_answers(rng: random.Random, n: int) -> tuple[str, list[str | None]]:
    """The gold and n responses' final answers (None: the response has no box). About half are
    right, in one of the gold's forms; a few are pathological."""
    gold, forms, wrong = answer_family(rng)
    p_right = rng.choice([0.1, 0.4, 0.6, 0.9])
    out: list[str | None] = []
    for _ in range(n):
        u = rng.random()
        if u < 0.03:
            out.append(rng.choice(_PATHOLOGICAL))
        elif u < 0.05:
            out.append(None)
        elif rng.random() < p_right:
            out.append(rng.choice(forms))
        else:
            out.append(rng.choice(wrong))
    return gold, out


class TraceBuilder:
    """Token ids of reasoning-like text of a given length, assembled from pre-encoded sentences."""

    def __init__(self, tokenizer, rng: random.Random, pool_size: int = 400) -> None:
        self.tok = tokenizer
        self.pieces: list[list[int]] = []
        for _ in range(pool_size):
            s = rng.choice(_SENTENCES).format(a=rng.randint(2, 999), b=rng.randint(2, 999), c=rng.randint(2, 99))
            self.pieces.append(tokenizer.encode(" " + s, add_special_tokens=False))
        self.eos = tokenizer.eos_token_id

    def ids(self, rng: random.Random, length: int, answer: str | None, truncated: bool) -> list[int]:
        tail: list[int] = []
        if not truncated:
            box = _UNCLOSED if answer == "<unclosed>" else (
                "" if answer is None else f" So the final answer is $\\boxed{{{answer}}}$.")
            tail = self.tok.encode(box, add_special_tokens=False) + ([self.eos] if self.eos is not None else [])
        body: list[int] = []
        want = max(0, length - len(tail))
        while len(body) < want:
            body.extend(self.pieces[rng.randrange(len(self.pieces))])
        del body[want:]
        return body + tail


def train_bench_tokenizer(vocab_size: int = 32768):
    """A byte-level BPE tokenizer trained on the sentence pool (Qwen3's pipeline: byte-level BPE)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [rng.choice(_SENTENCES).format(a=rng.randint(2, 999), b=rng.randint(2, 999), c=rng.randint(2, 99))
              for _ in range(20000)]
    families = [answer_family(rng) for _ in range(2000)]
    corpus += [f"So the final answer is $\\boxed{{{f}}}$." for _, forms, wrong in families for f in forms + wrong]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>")


def sglang_answer(ids: list[int], logprobs: list[float], truncated: bool) -> dict:
    """What SGLang's /generate gives for one sample (the fields the client reads)."""
    return {
        "text": "",
        "output_ids": ids,
        "meta_info": {
            "output_token_logprobs": [[lp, t, None] for lp, t in zip(logprobs, ids)],
            "finish_reason": {"type": "length"} if truncated else {"type": "stop", "matched": 2},
            "weight_version": "7",
        },
    }


# --------------------------------------------------------------------------------------------
# One run at a given worker count
# --------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, workers: int) -> list[Row]:
    os.environ["RAYON_NUM_THREADS"] = str(workers)  # the tokenizers decoder's threads
    import torch

    # one intra-op thread, as in a trainer process (torchrun sets OMP_NUM_THREADS=1): the tensor phases
    # are not parallelized, grading and decoding are (the workers)
    torch.set_num_threads(1)
    from tempo_mega.algo import em_token_advantages, filter_groups
    from tempo_mega.algo.correction import logprob_mismatch, truncated_is
    from tempo_mega.batch import RolloutBatch
    from tempo_mega.config import load_config
    from tempo_mega.controller import TempoController
    from tempo_mega.rewards import compute_score, empo_rewards, ttrl_rewards
    from tempo_mega.rollout.base import Sample
    from tempo_mega.rollout.sglang import SGLangRolloutEngine

    if not args.baseline:
        from tempo_mega.data.tokenizer import decode_responses
        from tempo_mega.rewards import grade_responses, pseudo_rewards
        from tempo_mega.rollout.samples import pack_samples, unpack_samples

    # model.path is mandatory in the presets and unused here (no model is loaded)
    cfg = load_config([f"experiment={args.experiment}", "model.path=unused", *args.overrides])
    a, r = cfg.algo, cfg.rollout
    n = a.num_samples_per_prompt
    n_lab = max(1, round(a.labeled_prompts_per_step * args.scale))
    n_unl = max(1, round(a.unlabeled_prompts_per_step * args.scale))
    max_len = r.max_response_tokens
    rng = random.Random(args.seed)

    if args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tok = train_bench_tokenizer()
    builder = TraceBuilder(tok, rng)
    prompt = tok.encode(" What is the value of the expression? Please reason step by step.", add_special_tokens=False)

    def make_part(groups: int, labeled: bool):
        golds, lengths = [], []
        samples_json = []
        for g in range(groups):
            gold, answers = group_answers(rng, n)
            golds.append(gold)
            for ans in answers:
                length = response_length(rng, max_len)
                truncated = length >= max_len
                if rng.random() < 0.01:
                    ans = "<unclosed>"
                ids = builder.ids(rng, length, ans, truncated)
                lps = [-rng.expovariate(3.0) for _ in range(len(ids))]
                samples_json.append((g, json.dumps(sglang_answer(ids, lps, truncated))))
                lengths.append(len(ids))
        return golds, samples_json, lengths

    t0 = time.perf_counter()
    lab_golds, lab_json, lab_len = make_part(n_lab, True)
    unl_golds, unl_json, unl_len = make_part(n_unl, False)
    tokens = sum(lab_len) + sum(unl_len)
    print(f"  [workers={workers}] {len(lab_json) + len(unl_json)} responses, {tokens / 1e6:.1f}M response "
          f"tokens (mean {tokens / (len(lab_json) + len(unl_json)):.0f}, "
          f"{sum(x >= max_len for x in lab_len + unl_len)} truncated), built in {time.perf_counter() - t0:.0f} s",
          flush=True)

    rows: list[Row] = []
    if not args.baseline:  # once per run, not per step: a row of its own, outside the total
        from tempo_mega.rewards import start_grading_workers

        timed(rows, "grading workers start", workers, "workers", lambda: start_grading_workers(workers),
              in_total=False)

    def step(rows: list[Row], last: bool) -> None:
        decoded = [json.loads(s) for _, s in lab_json + unl_json]  # the HTTP client's json parse: not ours
        n_samples = len(decoded)

        def parse():
            return [SGLangRolloutEngine._parse_output(out, idx // n) for idx, out in enumerate(decoded)]

        samples: list[Sample] = timed(rows, "parse", tokens, "tokens", parse)
        decoded.clear()
        lab_samples, unl_samples = samples[: len(lab_json)], samples[len(lab_json):]
        if args.baseline:  # the controller's code before this benchmark: one decode call per response
            def decode():
                return [tok.decode(s.response_ids, skip_special_tokens=True) for s in samples]
        else:
            def decode():
                return decode_responses(tok, [s.response_ids for s in samples])
        texts = timed(rows, "decode", tokens, "tokens", decode)
        lab_texts, unl_texts = texts[: len(lab_samples)], texts[len(lab_samples):]
        golds = [lab_golds[i // n] for i in range(len(lab_samples))]
        if args.baseline:  # sequential, in this process (the controller's loop before this benchmark)
            def grade():
                return [compute_score(t, g, lenient=a.lenient_grading) > 0 for t, g in zip(lab_texts, golds)]

            def cluster(mode):
                fn = ttrl_rewards if mode == "ttrl" else empo_rewards
                return [fn(g)[0] for g in groups]
        else:
            def grade():
                return grade_responses(lab_texts, golds, lenient=a.lenient_grading, workers=workers)

            def cluster(mode):
                return pseudo_rewards(mode, groups, positive=a.score_positive, negative=a.score_negative,
                                      workers=workers)
        ok = timed(rows, "grade", len(lab_texts), "responses", grade)
        scores = [a.score_positive if x else a.score_negative for x in ok]
        groups = [unl_texts[i:i + n] for i in range(0, len(unl_texts), n)]
        for mode in ("ttrl", "empo"):
            timed(rows, mode, len(groups), "groups", lambda mode=mode: cluster(mode), in_total=False)

        lab_rows = ([prompt] * len(lab_samples), lab_samples, True, [s.prompt_index for s in lab_samples], scores,
                    lab_texts, golds)
        unl_rows = ([prompt] * len(unl_samples), unl_samples, False, [n_lab + s.prompt_index for s in unl_samples],
                    [0.0] * len(unl_samples), unl_texts, [None] * len(unl_samples))

        if args.baseline:  # the controller before: a padded batch per part, joined, then the kept rows selected
            def filt():
                built = [RolloutBatch.from_samples(
                    pr, [x.response_ids for x in sm], is_labeled=[lab] * len(sm), group_ids=gid,
                    pad_token_id=tok.pad_token_id, rollout_logprobs=[x.logprobs for x in sm], scores=sc,
                    meta={"text": tx, "answer": an, "truncated": [x.finish_reason == "length" for x in sm]})
                    for pr, sm, lab, gid, sc, tx, an in (lab_rows, unl_rows)]
                batch = RolloutBatch.cat(built, pad_token_id=tok.pad_token_id)
                res = filter_groups(batch.scores, batch.group_ids, batch.is_labeled, target_num_groups=None)
                return batch.select(res.keep).trim()

            batch = timed(rows, "filter+batch", n_samples, "responses", filt)
        else:  # the controller now: the filter on the per-row fields, one padded batch of the kept rows
            from tempo_mega.rollout.parts import SampledPart

            parts = [SampledPart(prompt_ids=pr, samples=sm, labeled=lab, group_ids=gid, scores=sc, texts=tx, answers=an)
                     for pr, sm, lab, gid, sc, tx, an in (lab_rows, unl_rows)]

            def filt():
                whole = SampledPart.join(parts)
                res = filter_groups(torch.tensor(whole.scores), torch.tensor(whole.group_ids),
                                    torch.tensor(whole.labeled_rows()), target_num_groups=None)
                return whole.select(res.keep.nonzero().flatten().tolist())

            kept = timed(rows, "filter", n_samples, "responses", filt)
            batch = timed(rows, "batch", tokens, "tokens", lambda: kept.to_batch(tok.pad_token_id))
            del parts, kept
        lab_rows = unl_rows = None  # noqa: F841 - the rows go with the batch built from them

        def transports(suffix: str, items: list, count: int, in_total: bool) -> None:
            timed(rows, f"transport pickle{suffix}", count, "tokens",
                  lambda: pickle.loads(pickle.dumps([(items, None, {})], protocol=pickle.HIGHEST_PROTOCOL)),
                  in_total=in_total and (args.baseline or args.transport == "pickle"))
            if not args.baseline:
                timed(rows, f"transport tensors{suffix}", count, "tokens",
                      lambda: unpack_samples(*_roundtrip_tensors(pack_samples(items))),
                      in_total=in_total and args.transport == "tensors")

        transports("", samples, tokens, True)  # this step's samples
        transport_scale = args.transport_scale if last else 0.0  # the worst-case rows once, in the last step
        # and at the real worst-case size: every response at max length (2,048 x 16,384 = 33.5M tokens)
        full = [Sample(prompt_index=s.prompt_index, response_ids=(s.response_ids * (max_len // max(1, len(s.response_ids)) + 1))[:max_len],
                       logprobs=(s.logprobs * (max_len // max(1, len(s.logprobs)) + 1))[:max_len],
                       finish_reason=s.finish_reason, extra=dict(s.extra))
                for s in samples[: max(1, round(transport_scale * n_samples))]] if transport_scale > 0 else []
        if full:
            full_tokens = sum(len(s.response_ids) for s in full)
            print(f"  [workers={workers}] transport at {len(full)} x {max_len} = {full_tokens / 1e6:.1f}M tokens", flush=True)
            transports(f" @{full_tokens / 1e6:.1f}M", full, full_tokens, False)
            full.clear()

        def pack():
            mbs = batch.split_by_tokens(a.actor.max_tokens_per_micro_batch)
            return [mb.to_packed() for mb in mbs]

        timed(rows, "pack", batch.num_tokens(), "tokens", pack)

        # what the GPU passes give back (the critic's values, the trainer's log-probs): stand-ins, made
        # before the timed phase (their making is not host work of the step)
        batch.values = torch.randn(batch.response_mask.shape) * 0.1
        batch.old_logprobs = batch.rollout_logprobs + 0.01 * torch.randn_like(batch.rollout_logprobs)

        def advantages():
            m = logprob_mismatch(batch.rollout_logprobs, batch.old_logprobs, batch.response_mask)
            batch.advantages, batch.returns = em_token_advantages(batch.values, batch.scores, batch.response_mask,
                                                                  batch.is_labeled, eps=a.adv_eps)
            batch.advantages, tis = truncated_is(batch.advantages, batch.old_logprobs, batch.rollout_logprobs,
                                                 batch.response_mask, 2.0)
            m.update(tis)
            m.update(TempoController.rollout_metrics(batch))
            return m

        timed(rows, "advantages", int(batch.response_mask.sum()), "tokens", advantages)

    # the step as a running trainer does it: ``--steps`` steps in one process, each on new samples of the
    # same shape (with the trainer's host-memory setting), the last step reported, the first one's
    # total (a fresh process: every buffer faulted in) beside it
    from tempo_mega.hostmem import apply_host_memory

    apply_host_memory(args.host_memory)
    totals = []
    for k in range(args.steps):
        if k:  # new samples (fresh answers: the grading cache starts cold for them), as a real step gets
            lab_golds, lab_json, lab_len = make_part(n_lab, True)
            unl_golds, unl_json, unl_len = make_part(n_unl, False)
            tokens = sum(lab_len) + sum(unl_len)
        step_rows: list[Row] = []
        step(step_rows, last=k == args.steps - 1)
        totals.append(sum(r.seconds for r in step_rows if r.in_total))
        print(f"  [workers={workers}] step {k + 1}/{args.steps}: {totals[-1]:.2f} s", flush=True)
        gc.collect()
    if args.steps > 1:
        rows.append(Row("first step (cold process)", totals[0], 1, "steps", 0.0, in_total=False))
    rows += step_rows
    return rows


def _roundtrip_tensors(packed):
    """What a broadcast does to the flat tensors on the receiving side: a copy of each buffer, and
    the small pickled remainder."""
    tensors, rest = packed
    return [t.clone() for t in tensors], pickle.loads(pickle.dumps(rest))


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def markdown(results: dict[int, list[Row]]) -> str:
    ws = sorted(results)
    head = "| phase | " + " | ".join(f"s ({w} worker{'s' if w > 1 else ''}) | items/s | peak RSS GiB" for w in ws) + " |"
    sep = "|---|" + "---:|---:|---:|" * len(ws)
    lines = [head, sep]
    phases = [r.phase for r in results[ws[0]]]
    for p in phases:
        cells = []
        for w in ws:
            row = next(r for r in results[w] if r.phase == p)
            cells += [f"{row.seconds:.2f}", f"{row.per_s:,.0f} {row.unit}", f"{row.peak_rss_gib:.1f}"]
        mark = "" if next(r for r in results[ws[0]] if r.phase == p).in_total else " (not in total)"
        lines.append(f"| {p}{mark} | " + " | ".join(cells) + " |")
    totals = [sum(r.seconds for r in results[w] if r.in_total) for w in ws]
    lines.append("| **total** | " + " | ".join(f"**{t:.2f}** | | " for t in totals) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="qwen3_8b_tempo")
    ap.add_argument("--workers", default=None,
                    help="comma-separated worker counts, each run in a fresh process (default: 1 and all cores)")
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the preset's prompts per step (default 1)")
    ap.add_argument("--transport-scale", type=float, default=1.0,
                    help="fraction of the responses used for the transport rows (each at max length; 0: skip)")
    ap.add_argument("--transport", choices=("pickle", "tensors"), default="tensors",
                    help="which transport the total counts (the product uses tensors)")
    ap.add_argument("--tokenizer", default=None, help="a real tokenizer (path or hub name) instead of the bench's BPE")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=2,
                    help="steps run in the process on the same inputs; the last is reported (default 2: a "
                         "running trainer's step, with the first, cold one's total beside it)")
    ap.add_argument("--host-memory", choices=("retain", "system"), default="retain",
                    help="trainer.host_memory for the run (default retain, the trainer's default)")
    ap.add_argument("--baseline", action="store_true",
                    help="the step's host code as it was before this benchmark (per-response decode, sequential "
                         "grading and clustering, pickled transport): the 'before' column")
    ap.add_argument("--markdown", default=None, help="also write the table here")
    ap.add_argument("--json", default=None, help="write the rows as JSON here")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: one worker count
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the experiment (key=value)")
    args = ap.parse_args(argv)

    if args.one is not None:
        rows = run(args, args.one)
        print("ROWS " + json.dumps([r.__dict__ for r in rows]), flush=True)
        return 0

    counts = [int(x) for x in args.workers.split(",")] if args.workers else sorted({1, os.cpu_count() or 1})
    results: dict[int, list[Row]] = {}
    for w in counts:
        cmd = [sys.executable, os.path.abspath(__file__), "--one", str(w), "--experiment", args.experiment,
               "--scale", str(args.scale), "--transport-scale", str(args.transport_scale),
               "--transport", "pickle" if args.baseline else args.transport, "--seed", str(args.seed),
               "--steps", str(args.steps), "--host-memory", args.host_memory,
               *(["--baseline"] if args.baseline else []), *(["--tokenizer", args.tokenizer] if args.tokenizer else []),
               *args.overrides]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        out = proc.stdout
        sys.stdout.write("".join(line + "\n" for line in out.splitlines() if not line.startswith("ROWS ")))
        if proc.returncode != 0:
            print(f"bench_host_step: the run with {w} workers failed (exit {proc.returncode})", file=sys.stderr)
            return proc.returncode
        payload = next(line for line in out.splitlines() if line.startswith("ROWS "))[5:]
        results[w] = [Row(**d) for d in json.loads(payload)]
    table = markdown(results)
    cores = os.cpu_count()
    print(f"\nhost side of one {args.experiment} step (scale {args.scale}), {cores}-core machine:\n")
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({str(w): [r.__dict__ for r in rows] for w, rows in results.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
