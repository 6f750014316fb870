"""Evaluation benchmarks from local exports: AIME 2024/2025/2026, BeyondAIME, OlymMath, GPQA-Diamond.

Nothing is downloaded: each benchmark is a file you exported (jsonl as documented in docs/eval.md; the
json/parquet/``save_to_disk`` forms that ``tempo_mega.data.load_prompts`` reads work too).

Two kinds of items:

- ``"math"`` (AIME, BeyondAIME, OlymMath): the prompt is the problem text, the gold is the answer,
  graded by the math verifier (``tempo_mega.rewards.math``, strict or lenient).
- ``"choice"`` (GPQA-Diamond): the prompt is the question followed by the correct answer and the three
  incorrect ones in a seeded shuffle, labeled ``A)``..``D)``; the gold is the letter of the correct
  answer. A response is graded by the letter in its last ``\\boxed{}`` (or, without a box, a response
  that is nothing but a letter), compared with the gold letter; lenient grading changes nothing here.

Exports name their fields differently (``problem`` or ``question``, ``answer`` or ``Answer``): each
benchmark accepts a few names per field, chosen by what the file's first row holds (``BenchmarkSpec``),
or an explicit ``FieldMap``. A bad row raises ``ValueError`` naming ``file:line`` and the field.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tempo_mega.data import FieldMap, PromptRecord, load_prompts
from tempo_mega.rewards.math import compute_score, extract_answer, normalize_answer

__all__ = [
    "BENCHMARKS",
    "CHOICE_LETTERS",
    "CHOICE_INSTRUCTION",
    "BenchmarkItem",
    "BenchmarkSpec",
    "ChoiceFieldMap",
    "benchmark_spec",
    "extract_choice",
    "extracted_answer",
    "grade_response",
    "load_benchmark",
    "shuffle_options",
]

KINDS = ("math", "choice")
CHOICE_LETTERS = "ABCD"
CHOICE_INSTRUCTION = "Answer with the letter (A, B, C or D) of the correct option."
"""Put between the options and the template suffix (``format_prompt`` adds "Please reason step by
step, and put your final answer within \\boxed{}.")."""


@dataclass(frozen=True)
class ChoiceFieldMap:
    """Where a multiple-choice row keeps its question, its correct answer and the three incorrect ones
    (dotted paths, as in ``FieldMap``); ``id=None``: items are numbered by row."""

    question: str = "Question"
    correct: str = "Correct Answer"
    incorrect: tuple[str, str, str] = ("Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
    id: str | None = None


@dataclass(frozen=True)
class BenchmarkSpec:
    """A benchmark: its kind and the field names its exports use, tried in order (the first name the
    file's first row holds wins, per field; with none present the first name is used, so the error
    names it). ``answer_fields`` of a choice benchmark are the correct-answer field names, and
    ``incorrect_fields`` the name triples of the incorrect answers."""

    name: str
    kind: str
    title: str
    prompt_fields: tuple[str, ...]
    answer_fields: tuple[str, ...]
    id_fields: tuple[str, ...] = ("id", "ID", "unique_id", "problem_id", "Record ID")
    incorrect_fields: tuple[tuple[str, str, str], ...] = ()
    aliases: tuple[str, ...] = ()


_MATH_PROMPTS = ("problem", "question", "Problem", "Question")
_MATH_ANSWERS = ("answer", "Answer")

BENCHMARKS: dict[str, BenchmarkSpec] = {
    s.name: s
    for s in (
        BenchmarkSpec("aime24", "math", "AIME 2024", _MATH_PROMPTS, _MATH_ANSWERS, aliases=("aime2024",)),
        BenchmarkSpec("aime25", "math", "AIME 2025", _MATH_PROMPTS, _MATH_ANSWERS, aliases=("aime2025",)),
        BenchmarkSpec("aime26", "math", "AIME 2026", _MATH_PROMPTS, _MATH_ANSWERS, aliases=("aime2026",)),
        BenchmarkSpec("beyond_aime", "math", "BeyondAIME", _MATH_PROMPTS, _MATH_ANSWERS, aliases=("beyondaime",)),
        BenchmarkSpec("olymmath", "math", "OlymMath", _MATH_PROMPTS, _MATH_ANSWERS),
        BenchmarkSpec(
            "gpqa_diamond",
            "choice",
            "GPQA-Diamond",
            prompt_fields=("Question", "question"),
            answer_fields=("Correct Answer", "correct_answer"),
            incorrect_fields=(
                ("Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"),
                ("incorrect_answer_1", "incorrect_answer_2", "incorrect_answer_3"),
            ),
            aliases=("gpqa", "gpqadiamond"),
        ),
    )
}


def _squash(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def benchmark_spec(name: str) -> BenchmarkSpec:
    """The benchmark a name refers to: a name of ``BENCHMARKS`` or an alias, case, ``-`` and ``_``
    ignored, with any suffix (``olymmath_en_hard``, ``aime25-ii``: the longest known prefix wins)."""
    key = _squash(name)
    best: tuple[int, BenchmarkSpec] | None = None
    for spec in BENCHMARKS.values():
        for alias in (spec.name, *spec.aliases):
            a = _squash(alias)
            if key.startswith(a) and (best is None or len(a) > best[0]):
                best = (len(a), spec)
    if best is None:
        raise ValueError(
            f"unknown benchmark {name!r}: expected one of {', '.join(BENCHMARKS)} "
            "(or a name starting with one, e.g. olymmath_en_hard)"
        )
    return best[1]


@dataclass(frozen=True)
class BenchmarkItem:
    """One evaluation problem. ``prompt``: the question text (or chat messages) before the template
    suffix (``format_prompt`` adds it). ``gold``: the answer (math) or the correct letter (choice).
    ``choices``: the option texts in letter order A..D (choice items only). ``source``: ``file:line``."""

    id: str
    prompt: str | list[dict[str, str]]
    gold: str
    kind: str
    source: str
    choices: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------- loading


def _first_row(path: Path) -> Mapping[str, Any]:
    """The file's first row, to see which field names the export uses ({} if it is not an object:
    ``load_prompts`` then reports that row)."""
    from tempo_mega.data.datasets import _read_rows  # the one reader of every supported format

    for _, row in _read_rows(path, FieldMap(prompt="", answer=None)):
        return row if isinstance(row, Mapping) else {}
    raise ValueError(f"{path}: no rows")


def _pick(row: Mapping[str, Any], names: Sequence[str]) -> str | None:
    return next((n for n in names if n in row), None)


def _load(path: Path, field_map: FieldMap, spec: BenchmarkSpec, limit: int | None) -> list[PromptRecord]:
    try:
        return load_prompts(path, field_map, labeled=True, limit=limit)
    except ValueError as e:
        raise ValueError(f"{e} [{spec.title} export; accepted field names in docs/eval.md]") from None


def _math_items(path: Path, spec: BenchmarkSpec, field_map: FieldMap | None, limit: int | None) -> list[BenchmarkItem]:
    if field_map is None:
        row = _first_row(path)
        field_map = FieldMap(
            prompt=_pick(row, spec.prompt_fields) or spec.prompt_fields[0],
            answer=_pick(row, spec.answer_fields) or spec.answer_fields[0],
            id=_pick(row, spec.id_fields),
        )
    records = _load(path, field_map, spec, limit)
    return [
        BenchmarkItem(
            id=r.uid if field_map.id is not None else str(i),
            prompt=r.prompt,
            gold=r.answer,
            kind="math",
            source=r.source,
        )
        for i, r in enumerate(records)
    ]


def shuffle_options(question: str, correct: str, incorrect: Sequence[str], seed: int) -> tuple[list[str], str]:
    """The four options in a seeded order and the letter of the correct one.

    The order is ``numpy.random.default_rng([seed, h]).permutation(4)`` of ``[correct, *incorrect]``,
    where ``h`` is a hash of the question text: it depends on the seed and the question only, not on the
    row's position, so a subset or a reordered file gets the same letters."""
    if len(incorrect) != 3:
        raise ValueError(f"shuffle_options: need 3 incorrect answers, got {len(incorrect)}")
    h = int.from_bytes(hashlib.sha256(question.encode("utf-8", "surrogatepass")).digest()[:8], "little")
    order = np.random.default_rng([seed, h]).permutation(4).tolist()
    pool = [correct, *incorrect]
    options = [pool[i] for i in order]
    return options, CHOICE_LETTERS[order.index(0)]


def _choice_prompt(question: str, options: Sequence[str]) -> str:
    lines = [question.strip(), ""]
    lines += [f"{letter}) {text}" for letter, text in zip(CHOICE_LETTERS, options)]
    lines += ["", CHOICE_INSTRUCTION]
    return "\n".join(lines)


def _choice_items(
    path: Path, spec: BenchmarkSpec, field_map: ChoiceFieldMap | None, limit: int | None, seed: int
) -> list[BenchmarkItem]:
    if field_map is None:
        row = _first_row(path)
        incorrect = next((t for t in spec.incorrect_fields if all(n in row for n in t)), spec.incorrect_fields[0])
        field_map = ChoiceFieldMap(
            question=_pick(row, spec.prompt_fields) or spec.prompt_fields[0],
            correct=_pick(row, spec.answer_fields) or spec.answer_fields[0],
            incorrect=incorrect,
            id=_pick(row, spec.id_fields),
        )
    fm = field_map
    # One pass per option field: load_prompts checks each (present, a non-empty string or number) and
    # names file:line and the field on a bad row.
    correct = _load(path, FieldMap(prompt=fm.question, answer=fm.correct, id=fm.id), spec, limit)
    wrong = [_load(path, FieldMap(prompt=fm.question, answer=name), spec, limit) for name in fm.incorrect]
    items = []
    for i, r in enumerate(correct):
        if not isinstance(r.prompt, str):
            raise ValueError(f"{r.source}: field '{fm.question}' must be a string (the question text)")
        others = [w[i].answer for w in wrong]
        if len({r.answer, *others}) < 4:
            raise ValueError(
                f"{r.source}: the four options ('{fm.correct}', {', '.join(repr(n) for n in fm.incorrect)}) "
                "are not all different, so the gold letter would be ambiguous"
            )
        options, letter = shuffle_options(r.prompt, r.answer, others, seed)
        items.append(
            BenchmarkItem(
                id=r.uid if fm.id is not None else str(i),
                prompt=_choice_prompt(r.prompt, options),
                gold=letter,
                kind="choice",
                source=r.source,
                choices=tuple(options),
            )
        )
    return items


def load_benchmark(
    name: str,
    path: str | Path,
    *,
    field_map: FieldMap | ChoiceFieldMap | None = None,
    seed: int = 0,
    limit: int | None = None,
) -> list[BenchmarkItem]:
    """The items of benchmark ``name`` (see ``benchmark_spec``) from the export at ``path``.

    ``field_map``: the export's field names, when not one of the accepted ones (a ``FieldMap`` for math
    benchmarks, a ``ChoiceFieldMap`` for GPQA). ``seed``: the option shuffle of choice items.
    ``limit``: the first rows only. Item ids are the export's ids (``id``, ``ID``, ``unique_id``,
    ``problem_id``, ``Record ID``) where it has them, else the 0-based row number.

    Raises FileNotFoundError for a missing file and ValueError naming ``file:line`` and the field for a
    bad row (a missing, null or empty question or answer, repeated ids, equal GPQA options).
    """
    spec = benchmark_spec(name)
    path = Path(path)
    if spec.kind == "choice":
        if field_map is not None and not isinstance(field_map, ChoiceFieldMap):
            raise ValueError(f"benchmark {name!r} is multiple choice: field_map must be a ChoiceFieldMap")
        return _choice_items(path, spec, field_map, limit, seed)
    if field_map is not None and not isinstance(field_map, FieldMap):
        raise ValueError(f"benchmark {name!r} is a math benchmark: field_map must be a FieldMap")
    if field_map is not None and field_map.answer is None:
        raise ValueError(f"benchmark {name!r}: field_map.answer is None, but grading needs the answer")
    return _math_items(path, spec, field_map, limit)


# ---------------------------------------------------------------------------------------------- grading

_TEXT_WRAPPER_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textit|mbox)\s*\{([^{}]*)\}")
# "B", "(B)", "B." alone; with option text after it only behind a delimiter: "B) 42", "(B) 42", "B: 42"
_LONE_LETTER_RE = re.compile(r"\(?([A-Da-d])\)?\.?")
_LETTER_WITH_TEXT_RE = re.compile(r"(?:\(([A-Da-d])\)|([A-Da-d])[.:)])\s.*", re.DOTALL)


def _letter(text: str, *, with_text: bool) -> str | None:
    s = text.strip().replace("$", "")
    for _ in range(3):  # \text{\textbf{B}}
        s = _TEXT_WRAPPER_RE.sub(r"\1", s).strip()
    match = _LONE_LETTER_RE.fullmatch(s)
    if match:
        return match.group(1).upper()
    match = _LETTER_WITH_TEXT_RE.fullmatch(s) if with_text else None
    return (match.group(1) or match.group(2)).upper() if match else None


def extract_choice(response: str) -> str | None:
    """The option letter a response gives: the content of its last ``\\boxed{}`` read as a letter
    (``B``, ``(B)``, ``B.``, ``\\text{B}``, ``$B$``, ``B) 42``, ``(B) 42``, lower case too), or,
    without a box, a response that is only a letter (``"B"``, ``" (C). "``). Anything else: None."""
    if not isinstance(response, str):
        return None
    boxed = extract_answer(response)
    if boxed is not None:
        return _letter(boxed, with_text=True)
    if "\\boxed" in response or "\\fbox" in response:  # an unclosed box: a truncated response
        return None
    return _letter(response, with_text=False)


def extracted_answer(item: BenchmarkItem, response: str) -> str | None:
    """The final answer of a response as grading reads it: a letter for choice items, the normalized
    last boxed answer for math items (None where there is none)."""
    if item.kind == "choice":
        return extract_choice(response)
    answer = extract_answer(response)
    return None if answer is None else normalize_answer(answer)


def grade_response(item: BenchmarkItem, response: str, *, lenient: bool = False) -> bool:
    """Whether ``response`` answers ``item`` correctly: the math verifier (strict unless ``lenient``)
    for math items, the extracted letter against the gold letter for choice items."""
    if item.kind == "choice":
        return extract_choice(response) == item.gold
    if item.kind == "math":
        return compute_score(response, item.gold, lenient=lenient) > 0
    raise ValueError(f"item {item.id}: unknown kind {item.kind!r} (expected one of {KINDS})")
