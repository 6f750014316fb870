"""The run's prompts: the tokenizer, the labeled and unlabeled records, their token ids (computed once)
and the two samplers a step draws from (``PromptPool``), seen by the controller as a ``PromptSource``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tempo_mega.config import TrainConfig
from tempo_mega.data import FIELD_MAPS, FieldMap, PromptRecord, PromptSampler, format_prompt, load_prompts
from tempo_mega.data.synthetic import make_synthetic_task
from tempo_mega.data.synthetic_shift import make_shift_task
from tempo_mega.data.tokenizer import build_synthetic_tokenizer, decode_responses
from tempo_mega.models import stop_token_ids


@dataclass
class PromptSource:
    """Where a step's prompts come from: ``draw(kind, n)`` -> list of (token ids, gold answer or None).
    ``decode_batch``, where given, decodes many responses in one call (``data.decode_responses``)."""

    draw: Callable[[str, int], list[tuple[list[int], str | None]]]  # kind: "labeled" | "unlabeled"
    decode: Callable[[list[int]], str]
    pad_token_id: int
    stop_token_ids: tuple[int, ...]
    decode_batch: Callable[[list[list[int]]], list[str]] | None = None

    def decode_many(self, batch: list[list[int]]) -> list[str]:
        return self.decode_batch(batch) if self.decode_batch is not None else [self.decode(x) for x in batch]


def load_tokenizer(cfg: TrainConfig):
    from transformers import AutoTokenizer

    path = cfg.model.tokenizer_path or cfg.model.path
    if path is None:
        return build_synthetic_tokenizer()
    if not Path(path).is_dir():
        raise FileNotFoundError(f"config key 'model.tokenizer_path' / 'model.path': no directory {path}")
    return AutoTokenizer.from_pretrained(path)


def load_records(cfg: TrainConfig) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """(labeled train records, unlabeled test records with hidden answers)."""
    d = cfg.data
    if not d.uses_files and d.synthetic_task == "shift":
        return make_shift_task(d.synthetic_num_train, d.synthetic_num_test, seed=d.synthetic_seed)
    if not d.uses_files:
        return make_synthetic_task(d.synthetic_num_train, d.synthetic_num_test, seed=d.synthetic_seed,
                                   difficulty=d.synthetic_difficulty)

    def field_map(name: str) -> FieldMap:
        base = FIELD_MAPS[name]
        return dataclasses.replace(base, prompt=d.prompt_key or base.prompt, answer=d.answer_key or base.answer)

    train = [r for f in d.train_files for r in load_prompts(f, field_map(d.field_map), labeled=True)]
    test_map = field_map(d.test_field_map or d.field_map)
    test = [r for f in d.test_files for r in load_prompts(f, test_map, labeled=False)]
    return train, test


class PromptPool:
    """Token ids of every prompt (computed once), and the two samplers a step draws from."""

    def __init__(self, cfg: TrainConfig, tokenizer, train: list[PromptRecord], test: list[PromptRecord]):
        self.tokenizer, self.train, self.test = tokenizer, train, test
        self._ids: dict[str, list[int]] = {}
        self.max_prompt_tokens = cfg.data.max_prompt_tokens
        seed = cfg.trainer.seed
        self.samplers = {
            "labeled": PromptSampler(train, seed=seed) if train else None,
            "unlabeled": PromptSampler(test, seed=seed + 1) if test else None,
        }

    def ids(self, record: PromptRecord) -> list[int]:
        if record.uid not in self._ids:
            ids = format_prompt(record.prompt, self.tokenizer)
            if len(ids) > self.max_prompt_tokens:
                raise ValueError(f"{record.source}: prompt has {len(ids)} tokens, more than "
                                 f"data.max_prompt_tokens={self.max_prompt_tokens}")
            self._ids[record.uid] = ids
        return self._ids[record.uid]

    def draw(self, kind: str, n: int) -> list[tuple[list[int], str | None]]:
        sampler = self.samplers[kind]
        if sampler is None:
            raise ValueError(f"no {kind} prompts: set data.{'train' if kind == 'labeled' else 'test'}_files "
                             f"or algo.{kind}_prompts_per_step=0")
        return [(self.ids(r), r.answer) for r in sampler.next_batch(n)]

    def source(self) -> PromptSource:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return PromptSource(draw=self.draw, decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
                            pad_token_id=pad, stop_token_ids=stop_token_ids(tok),
                            decode_batch=lambda batch: decode_responses(tok, batch))

    def state_dict(self) -> dict[str, Any]:
        return {k: s.state_dict() for k, s in self.samplers.items() if s is not None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, s in state.items():
            self.samplers[k].load_state_dict(s)
