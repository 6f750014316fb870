"""The prompt template of the paper: the question followed by ``PLAIN_SUFFIX``.

Two renderings, chosen by ``use_chat_template`` (default: the chat template when the tokenizer has one):

- chat: the question (with the suffix) is the last user message, rendered with the tokenizer's chat
  template and ``add_generation_prompt=True``;
- plain: ``question.rstrip() + " " + PLAIN_SUFFIX``; for a list of messages, their contents joined by
  ``"\\n\\n"`` (the suffix added to the last user message first). Encoded with the tokenizer's own
  special tokens (a BOS where the model has one).

The suffix is added only where it is missing: a question that already contains it is left as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

PLAIN_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."

Prompt = str | Sequence[dict[str, Any]]


def with_suffix(question: str) -> str:
    """``question.rstrip() + " " + PLAIN_SUFFIX``, or ``question`` if it already contains the suffix."""
    if PLAIN_SUFFIX in question:
        return question
    return f"{question.rstrip()} {PLAIN_SUFFIX}"


def to_messages(prompt: Prompt) -> list[dict[str, str]]:
    """Chat messages with the suffix on the last user message (unless some message already has it)."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("format_prompt: the prompt is empty")
        return [{"role": "user", "content": with_suffix(prompt)}]
    messages = [dict(m) for m in prompt]
    if not messages:
        raise ValueError("format_prompt: the prompt is an empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"format_prompt: message {i} needs string 'role' and 'content', got {m!r}")
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        raise ValueError("format_prompt: the messages have no 'user' message to put the question in")
    if not any(PLAIN_SUFFIX in m["content"] for m in messages):
        last = users[-1]
        messages[last] = {**messages[last], "content": with_suffix(messages[last]["content"])}
    return messages


def _uses_chat_template(tokenizer: Any, use_chat_template: bool | None) -> bool:
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if use_chat_template and not has_template:
        raise ValueError("format_prompt: use_chat_template=True but the tokenizer has no chat template")
    return has_template if use_chat_template is None else use_chat_template


def render_prompt(prompt: Prompt, tokenizer: Any, *, use_chat_template: bool | None = None) -> str:
    """The prompt text exactly as ``format_prompt`` tokenizes it (useful in logs)."""
    messages = to_messages(prompt)
    if _uses_chat_template(tokenizer, use_chat_template):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in messages)


def format_prompt(prompt: Prompt, tokenizer: Any, *, use_chat_template: bool | None = None) -> list[int]:
    """Token ids of the templated prompt: a question string or a list of ``{"role", "content"}`` messages.

    The chat rendering already holds every special token the template wants, so it is encoded without
    adding more; the plain rendering is encoded with the tokenizer's default special tokens.
    """
    chat = _uses_chat_template(tokenizer, use_chat_template)
    text = render_prompt(prompt, tokenizer, use_chat_template=chat)
    return list(tokenizer(text, add_special_tokens=not chat)["input_ids"])
