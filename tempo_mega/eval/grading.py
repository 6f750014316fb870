"""Grading of recorded responses: ``evaluate_generations`` turns n responses per benchmark problem into metrics.

No model is involved: each response is graded against its item's gold answer (``benchmarks.grade_response``:
the math verifier, strict or lenient, or the letter of a choice), and the metrics are ``avg@n``, unbiased
``pass@k`` for k = 1, 2, 4, ... up to n (and n itself, ``pass_at_k_values``), answer diversity, the share of
responses without an answer, mean response length and truncation rate, with per-prompt correctness beside
them. ``MODES`` are the two grading modes and ``MODE_NOTES`` the line each report prints to say which made
its numbers (lenient inflates scores).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tempo_mega.eval.benchmarks import BenchmarkItem, extracted_answer, grade_response
from tempo_mega.eval.metrics import avg_at_k, distinct_answer_ratio, distinct_answers, pass_at_k_batch

MODES = ("strict", "lenient")
MODE_NOTES = {
    "strict": "strict = exact symbolic/numeric equivalence (math-verify)",
    "lenient": "lenient = strict, or numbers within 2e-3 relative (the published grader; inflates scores)",
}


# ---------------------------------------------------------------------------------------------- metrics


def pass_at_k_values(n: int) -> list[int]:
    """The k of the pass@k a run of n samples per prompt reports: powers of two up to n, and n."""
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return ks if ks[-1] == n else [*ks, n]


def _check_table(name: str, table: Sequence[Sequence[Any]], num_items: int, n: int) -> None:
    if len(table) != num_items:
        raise ValueError(f"evaluate_generations: {name} has {len(table)} rows for {num_items} items")
    for p, row in enumerate(table):
        if isinstance(row, str) or len(row) != n:
            raise ValueError(f"evaluate_generations: {name}[{p}] must hold {n} entries (one per generation)")


def evaluate_generations(
    items: Sequence[BenchmarkItem],
    generations: Sequence[Sequence[str]],
    *,
    lenient: bool = False,
    token_counts: Sequence[Sequence[int]] | None = None,
    finish_reasons: Sequence[Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Grade recorded responses. ``generations``: [P, n] response texts, row p answering ``items[p]``;
    every row has the same n >= 1. ``token_counts``: [P, n] response lengths in tokens (else lengths
    are counted in characters); ``finish_reasons``: [P, n] ``"stop"`` | ``"length"``.

    Returns ``{"grading": "strict"|"lenient", "n", "num_prompts", "response_len_unit": "tokens"|"chars",
    "metrics": {...}, "per_prompt": [...]}``. ``metrics``:

    - ``avg@n``: mean over prompts of the fraction of correct responses;
    - ``pass@k`` for k in ``pass_at_k_values(n)``: mean over prompts of 1 - C(n-c, k) / C(n, k);
    - ``diversity/distinct_answers``: mean over prompts of the number of distinct extracted answers
      (normalized strings for math, letters for choice; a response without an answer is not counted);
      ``diversity/distinct_ratio``: the same divided by n;
    - ``answer_missing_rate``: share of responses with no extractable answer;
    - ``response_len_mean``: mean response length (``response_len_unit``);
    - ``truncation_rate``: share of responses that hit the length limit (only with ``finish_reasons``).

    ``per_prompt``: ``{"id", "gold", "num_correct", "correct": [n bools], "answers": [n str|None]}``.
    """
    if not items:
        raise ValueError("evaluate_generations: no items")
    n = len(generations[0]) if len(generations) else 0
    if n < 1:
        raise ValueError("evaluate_generations: need at least one generation per item")
    _check_table("generations", generations, len(items), n)
    if token_counts is not None:
        _check_table("token_counts", token_counts, len(items), n)
    if finish_reasons is not None:
        _check_table("finish_reasons", finish_reasons, len(items), n)

    correct = [[grade_response(item, text, lenient=lenient) for text in row] for item, row in zip(items, generations)]
    answers = [[extracted_answer(item, text) for text in row] for item, row in zip(items, generations)]
    metrics: dict[str, float] = {f"avg@{n}": avg_at_k(correct)}
    for k in pass_at_k_values(n):
        metrics[f"pass@{k}"] = pass_at_k_batch(correct, k)
    metrics["diversity/distinct_answers"] = distinct_answers(answers)
    metrics["diversity/distinct_ratio"] = distinct_answer_ratio(answers)
    metrics["answer_missing_rate"] = sum(a is None for row in answers for a in row) / (len(items) * n)
    if token_counts is not None:
        lengths, unit = [int(c) for row in token_counts for c in row], "tokens"
    else:
        lengths, unit = [len(text) for row in generations for text in row], "chars"
    metrics["response_len_mean"] = sum(lengths) / len(lengths)
    if finish_reasons is not None:
        metrics["truncation_rate"] = sum(r == "length" for row in finish_reasons for r in row) / (len(items) * n)
    per_prompt = [
        {"id": item.id, "gold": item.gold, "num_correct": sum(row), "correct": row, "answers": ans}
        for item, row, ans in zip(items, correct, answers)
    ]
    return {
        "grading": "lenient" if lenient else "strict",
        "n": n,
        "num_prompts": len(items),
        "response_len_unit": unit,
        "metrics": metrics,
        "per_prompt": per_prompt,
    }
