"""Data for a TEMPO run: prompt datasets and sampling, the prompt template, a local tokenizer, and a
built-in verifiable arithmetic task (so a whole run needs no external data or hub download).

The names below load on first use, so that config validation (which reads ``datasets.FIELD_MAPS``)
does not import transformers.
"""

from __future__ import annotations

from tempo_mega._lazy import lazy_getattr

_NAMES = {
    **dict.fromkeys(("FIELD_MAPS", "FieldMap", "PromptRecord", "PromptSampler", "load_prompts", "write_jsonl"),
                    "datasets"),
    **dict.fromkeys(("DIFFICULTIES", "FAMILIES", "TRAP_FAMILIES", "make_synthetic_task", "solution_text"),
                    "synthetic"),
    **dict.fromkeys(("PLAIN_SUFFIX", "format_prompt", "render_prompt", "to_messages", "with_suffix"), "templates"),
    **dict.fromkeys(("build_synthetic_tokenizer", "decode_responses"), "tokenizer"),
}
__all__ = sorted(_NAMES)

__getattr__ = lazy_getattr(__name__, _NAMES)
