"""Prompt datasets: loading (jsonl, json, parquet, HF ``save_to_disk`` folders) and seeded sampling.

A row becomes a ``PromptRecord`` through a ``FieldMap`` that says where the prompt, the answer and the id
live (dotted paths into nested rows: DAPO-Math-17K keeps its answer at ``reward_model.ground_truth``).

Where a row sits, in errors and in ``PromptRecord.source``:
- jsonl (and ``.json`` files holding one object per line): ``<path>:<line>``, line 1-based;
- parquet, a ``.json`` file holding one JSON array, a ``save_to_disk`` folder: ``<path>[<row>]``, row 0-based.

Labeled and unlabeled sets: ``labeled=True`` requires an answer on every row; ``labeled=False`` moves the
answers to ``hidden_answer`` (kept for evaluation only, never for the reward) and sets ``answer=None``;
``labeled=None`` keeps answers where the rows have them, and requires all rows to agree.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FIELD_MAPS",
    "FieldMap",
    "PromptRecord",
    "PromptSampler",
    "load_prompts",
    "write_jsonl",
]


@dataclass(frozen=True)
class FieldMap:
    """Where a row keeps its fields. Each is a dotted path into nested objects (``"reward_model.ground_truth"``;
    a numeric part indexes a list: ``"prompt.0.content"``). ``answer=None``: the rows carry no answer;
    ``id=None``: records are named by their source (``<path>:<line>`` / ``<path>[<row>]``).

    ``strip_prefix`` / ``strip_suffix``: answer-format instructions a dataset wraps its questions in, cut
    from the prompt (a string, or the last user message) where it starts / ends with them, so that the
    template's ``\\boxed{}`` instruction, which the verifier grades, is the only one the model sees."""

    prompt: str = "prompt"
    answer: str | None = "answer"
    id: str | None = None
    strip_prefix: str | None = None
    strip_suffix: str | None = None


# DAPO-Math-17K asks for the answer on a last line "Answer: ...", which the \boxed{} verifier would grade -1
DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'


FIELD_MAPS: dict[str, FieldMap] = {
    "default": FieldMap(),
    # {"prompt": [{"role": "user", "content": ...}], "reward_model": {"ground_truth": ...}, "extra_info": {"index": ...}}
    "dapo_math": FieldMap(prompt="prompt", answer="reward_model.ground_truth", id="extra_info.index",
                          strip_prefix=DAPO_PREFIX, strip_suffix=DAPO_SUFFIX),
    # AIME exports (HuggingFaceH4/aime_2024, math-ai/aime25, ...): {"problem": ..., "answer": ...}
    "aime": FieldMap(prompt="problem", answer="answer"),
    # what write_jsonl writes: {"id": ..., "prompt": ..., "answer": ...}
    "synthetic": FieldMap(prompt="prompt", answer="answer", id="id"),
}


@dataclass(frozen=True)
class PromptRecord:
    """One prompt. ``prompt`` is a question string or chat messages ``[{"role", "content"}, ...]``
    (the template suffix is added later, by ``format_prompt``). ``answer`` is the gold answer of a labeled
    prompt (it feeds the verifier reward); ``hidden_answer`` is the answer of an unlabeled prompt, kept for
    evaluation only. ``meta`` holds generator-specific facts (the synthetic task's family, operands)."""

    prompt: str | list[dict[str, str]]
    answer: str | None
    source: str
    uid: str
    hidden_answer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_labeled(self) -> bool:
        return self.answer is not None

    @property
    def eval_answer(self) -> str | None:
        """The answer to grade against in evaluation, labeled or not."""
        return self.answer if self.answer is not None else self.hidden_answer


# ---------------------------------------------------------------------------------------------- rows

_MISSING = object()


def _get_path(row: Any, dotted: str) -> Any:
    cur = row
    for part in dotted.split("."):
        if isinstance(cur, Mapping) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return _MISSING
    return cur


def _keys_hint(row: Mapping) -> str:
    return f" (the row has: {', '.join(map(str, row))})" if row else " (the row is empty)"


def _check_prompt(value: Any, where: str, name: str, row: Mapping) -> str | list[dict[str, str]]:
    if value is _MISSING:
        raise ValueError(f"{where}: field '{name}' is missing{_keys_hint(row)}")
    if value is None:
        raise ValueError(f"{where}: field '{name}' is null")
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{where}: field '{name}' is empty")
        return value
    if isinstance(value, list):
        if not value:
            raise ValueError(f"{where}: field '{name}' is an empty list of messages")
        messages = []
        for i, m in enumerate(value):
            if not (
                isinstance(m, Mapping)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
            ):
                raise ValueError(
                    f"{where}: field '{name}' message {i} must be an object with string 'role' and 'content', got {m!r:.80}"
                )
            messages.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "user" for m in messages):
            raise ValueError(f"{where}: field '{name}' has no message with role 'user'")
        if not any(m["content"].strip() for m in messages):
            raise ValueError(f"{where}: field '{name}' is empty (every message content is blank)")
        return messages
    raise ValueError(
        f"{where}: field '{name}' must be a string or a list of {{'role', 'content'}} messages, "
        f"got {type(value).__name__}"
    )


def _strip_instructions(prompt: str | list[dict[str, str]], field_map: FieldMap, where: str, name: str):
    """``prompt`` without ``field_map.strip_prefix`` / ``strip_suffix`` (see ``FieldMap``)."""
    if field_map.strip_prefix is None and field_map.strip_suffix is None:
        return prompt

    def cut(text: str) -> str:
        if field_map.strip_prefix and text.startswith(field_map.strip_prefix):
            text = text[len(field_map.strip_prefix):]
        if field_map.strip_suffix and text.endswith(field_map.strip_suffix):
            text = text[: -len(field_map.strip_suffix)]
        if not text.strip():
            raise ValueError(f"{where}: field '{name}' holds only the instructions the field map strips, no question")
        return text

    if isinstance(prompt, str):
        return cut(prompt)
    last = max(i for i, m in enumerate(prompt) if m["role"] == "user")
    return [{**m, "content": cut(m["content"])} if i == last else m for i, m in enumerate(prompt)]


def _check_answer(value: Any, where: str, name: str) -> str | None:
    """The answer as a string, None where the row has none. Numbers become strings (2.0 -> "2")."""
    if value is _MISSING or value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{where}: field '{name}' must be a string or a number, got bool")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: field '{name}' is not a finite number: {value}")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{where}: field '{name}' is empty")
        return value.strip()
    raise ValueError(f"{where}: field '{name}' must be a string or a number, got {type(value).__name__}")


def _check_id(value: Any, where: str, name: str) -> str:
    if value is _MISSING or value is None:
        raise ValueError(f"{where}: field '{name}' is missing")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(
            f"{where}: field '{name}' must be a string or an integer, got {type(value).__name__}"
        )
    uid = str(value)
    if not uid.strip():
        raise ValueError(f"{where}: field '{name}' is empty")
    return uid


# ---------------------------------------------------------------------------------------------- readers


def _read_json_lines(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    """A ``.json`` file: one JSON array of rows, or (anything else) JSON lines."""
    with path.open("rb") as f:
        head = f.read(4096).decode("utf-8", errors="ignore").lstrip("\ufeff \t\r\n")
    if not head.startswith("["):
        yield from _read_json_lines(path)
        return
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for i, row in enumerate(rows):
        yield f"{path}[{i}]", row


def _needed_columns(field_map: FieldMap) -> list[str]:
    paths = [field_map.prompt, field_map.answer, field_map.id]
    return list(dict.fromkeys(p.split(".")[0] for p in paths if p is not None))


def _read_arrow_batches(path: Path, batches: Iterable[Any]) -> Iterator[tuple[str, Any]]:
    i = 0
    for batch in batches:
        for row in batch.to_pylist():
            yield f"{path}[{i}]", row
            i += 1


def _read_parquet(path: Path, field_map: FieldMap) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is in the `data` extra
        raise ImportError(f"reading {path} needs pyarrow: pip install 'tempo-mega[data]'") from e
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a file that is not parquet
        raise ValueError(f"{path}: not a readable parquet file: {e}") from None
    names = set(pf.schema_arrow.names)
    columns = [c for c in _needed_columns(field_map) if c in names] or None
    yield from _read_arrow_batches(path, pf.iter_batches(batch_size=1024, columns=columns))


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _read_saved_dataset(path: Path, field_map: FieldMap) -> Iterator[tuple[str, Any]]:
    try:
        import datasets as hf_datasets
    except ImportError as e:  # pragma: no cover - datasets is in the `data` extra
        raise ImportError(f"reading {path} needs the datasets package: pip install 'tempo-mega[data]'") from e
    ds = hf_datasets.load_from_disk(str(path))
    if isinstance(ds, hf_datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(
                f"{path}: a DatasetDict with splits {sorted(ds)} and no 'train' split; "
                f"pass one split's folder instead ({path}/<split>)"
            )
        ds = ds["train"]
    columns = [c for c in _needed_columns(field_map) if c in ds.column_names]
    if columns:
        ds = ds.select_columns(columns)
    yield from _read_arrow_batches(path, ds.with_format("arrow").iter(batch_size=1024))


def _read_rows(path: Path, field_map: FieldMap) -> Iterator[tuple[str, Any]]:
    if not path.exists():
        raise FileNotFoundError(f"prompt data not found: {path}")
    if path.is_dir():
        if not _is_saved_dataset(path):
            raise ValueError(
                f"{path}: a directory, but not a dataset saved with datasets' save_to_disk "
                "(no dataset_dict.json, or state.json + dataset_info.json)"
            )
        return _read_saved_dataset(path, field_map)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_json_lines(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".parquet":
        return _read_parquet(path, field_map)
    raise ValueError(
        f"{path}: unsupported data file type {suffix!r} (expected .jsonl, .json, .parquet, "
        "or a folder written by datasets' save_to_disk)"
    )


# ---------------------------------------------------------------------------------------------- loading


def load_prompts(
    path: str | Path,
    field_map: FieldMap = FieldMap(),
    *,
    labeled: bool | None = None,
    limit: int | None = None,
) -> list[PromptRecord]:
    """Read prompt records from a jsonl/json/parquet file or a ``save_to_disk`` folder (DatasetDict: its
    "train" split). ``labeled`` as in the module docstring; ``limit`` keeps the first rows only.

    Raises FileNotFoundError for a missing path and ValueError, naming the place (``data.jsonl:7``,
    ``data.parquet[6]``) and the field, for a bad row: invalid JSON, a missing/null/empty prompt, a prompt
    that is neither a string nor a list of messages, an answer that is neither a string nor a number, a
    missing answer where ``labeled=True``, a missing or repeated id where ``FieldMap.id`` is set.
    """
    path = Path(path)
    if limit is not None and limit < 0:
        raise ValueError(f"load_prompts: limit must be >= 0, got {limit}")
    if labeled and field_map.answer is None:
        raise ValueError("load_prompts: labeled=True needs an answer field (FieldMap.answer is None)")
    rows = _read_rows(path, field_map)
    records: list[PromptRecord] = []
    first_seen: dict[str, str] = {}  # uid -> where it first appeared
    has_answers: tuple[bool, str] | None = None  # labeled=None: what the first row said, and where
    if limit == 0:
        return records
    for where, row in rows:
        if not isinstance(row, Mapping):
            raise ValueError(f"{where}: expected an object (a mapping of fields), got {type(row).__name__}")
        prompt = _check_prompt(_get_path(row, field_map.prompt), where, field_map.prompt, row)
        prompt = _strip_instructions(prompt, field_map, where, field_map.prompt)
        answer = None
        if field_map.answer is not None:
            answer = _check_answer(_get_path(row, field_map.answer), where, field_map.answer)
            if labeled and answer is None:
                raise ValueError(
                    f"{where}: field '{field_map.answer}' is missing (labeled=True needs an answer)"
                )
            if labeled is None:
                if has_answers is None:
                    has_answers = (answer is not None, where)
                elif has_answers[0] != (answer is not None):
                    state = "is missing, but" if answer is None else "is present, but"
                    other = "has one" if answer is None else "has none"
                    raise ValueError(
                        f"{where}: field '{field_map.answer}' {state} {has_answers[1]} {other}; pass labeled=True "
                        "(every row answered) or labeled=False (answers kept for evaluation only)"
                    )
        if field_map.id is not None:
            uid = _check_id(_get_path(row, field_map.id), where, field_map.id)
            if uid in first_seen:
                raise ValueError(
                    f"{where}: field '{field_map.id}' value {uid!r} repeats the id of {first_seen[uid]}"
                )
            first_seen[uid] = where
        else:
            uid = where
        if labeled is False:
            records.append(PromptRecord(prompt, None, where, uid, hidden_answer=answer))
        else:
            records.append(PromptRecord(prompt, answer, where, uid))
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise ValueError(f"{path}: no rows")
    return records


def write_jsonl(records: Iterable[PromptRecord], path: str | Path) -> Path:
    """Write records as JSON lines ``{"id", "prompt", "answer", "meta"}`` (read back with
    ``FIELD_MAPS["synthetic"]``). ``answer`` is the gold answer, or the hidden answer of an unlabeled
    record: load such a file with ``labeled=False`` to keep it hidden. Parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            row: dict[str, Any] = {"id": r.uid, "prompt": r.prompt}
            if r.eval_answer is not None:
                row["answer"] = r.eval_answer
            if r.meta:
                row["meta"] = r.meta
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- sampling


def _fingerprint(records: Sequence[PromptRecord]) -> str:
    h = hashlib.sha1()
    for r in records:
        h.update(r.uid.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()[:16]


class PromptSampler:
    """Batches of prompts in seeded shuffled epochs. Epoch e visits every record once, in the order
    ``numpy.random.default_rng([seed, e]).permutation(len(records))`` (identity when ``shuffle=False``);
    a batch that runs past the end of an epoch continues into the next one, so a batch may hold a record
    twice when it straddles two epochs. ``state_dict``/``load_state_dict`` restore the exact position: a
    resumed run draws the same prompts as an uninterrupted one."""

    def __init__(self, records: Sequence[PromptRecord], *, seed: int = 0, shuffle: bool = True) -> None:
        if len(records) == 0:
            raise ValueError("PromptSampler: no records to sample from")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"PromptSampler: seed must be a non-negative integer, got {seed!r}")
        self.records = list(records)
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0  # records of the current epoch already drawn
        self._fingerprint = _fingerprint(self.records)
        self._order = self._epoch_order(0)

    def __len__(self) -> int:
        return len(self.records)

    def _epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.records)))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.records)).tolist()

    def next_batch(self, n: int) -> list[PromptRecord]:
        """The next ``n`` records."""
        if n < 0:
            raise ValueError(f"PromptSampler.next_batch: n must be >= 0, got {n}")
        out: list[PromptRecord] = []
        while len(out) < n:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch)
            take = min(n - len(out), len(self._order) - self.position)
            out.extend(self.records[i] for i in self._order[self.position : self.position + take])
            self.position += take
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_records": len(self.records),
            "fingerprint": self._fingerprint,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from ``state_dict()``. The records must be the same (same count and uids, same order)."""
        if (
            state["num_records"] != len(self.records)
            or state.get("fingerprint", self._fingerprint) != self._fingerprint
        ):
            raise ValueError(
                f"PromptSampler.load_state_dict: the state was saved for another dataset "
                f"({state['num_records']} records, fingerprint {state.get('fingerprint')}) than this one "
                f"({len(self.records)} records, fingerprint {self._fingerprint})"
            )
        if not 0 <= state["position"] <= len(self.records) or state["epoch"] < 0:
            raise ValueError(
                f"PromptSampler.load_state_dict: epoch {state['epoch']}, position {state['position']} "
                f"out of range for {len(self.records)} records"
            )
        self.seed = int(state["seed"])
        self.shuffle = bool(state.get("shuffle", True))
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._epoch_order(self.epoch)
