"""Data for a TEMPO run: prompt datasets and sampling, the prompt template, a local tokenizer, and a
built-in verifiable arithmetic task (so a whole run needs no external data or hub download)."""

from tempo_mega.data.datasets import (
    FIELD_MAPS,
    FieldMap,
    PromptRecord,
    PromptSampler,
    load_prompts,
    write_jsonl,
)
from tempo_mega.data.synthetic import (
    DIFFICULTIES,
    FAMILIES,
    TRAP_FAMILIES,
    make_synthetic_task,
    solution_text,
)
from tempo_mega.data.templates import PLAIN_SUFFIX, format_prompt, render_prompt, to_messages, with_suffix
from tempo_mega.data.tokenizer import build_synthetic_tokenizer, decode_responses

__all__ = [
    "DIFFICULTIES",
    "FAMILIES",
    "FIELD_MAPS",
    "PLAIN_SUFFIX",
    "TRAP_FAMILIES",
    "FieldMap",
    "PromptRecord",
    "PromptSampler",
    "build_synthetic_tokenizer",
    "decode_responses",
    "format_prompt",
    "load_prompts",
    "make_synthetic_task",
    "render_prompt",
    "solution_text",
    "to_messages",
    "with_suffix",
    "write_jsonl",
]
