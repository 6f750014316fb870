"""A small Qwen-style tokenizer built locally, so the whole pipeline runs with no hub download.

Pipeline (the same parts as Qwen's tokenizer, with a hand-made vocabulary instead of learned merges):

- byte-level pre-tokenization (GPT-2 byte -> unicode map, no regex split), so every byte of any text has
  a token and ``decode(encode(x)) == x`` for any string, ASCII or not;
- a regex split that isolates a few whole words of the prompt template (" reason", "\\boxed", ...) and
  otherwise cuts the text into single bytes; digits are always single tokens, which keeps arithmetic
  learnable by a tiny model;
- a word-level model over 3 special tokens + 256 bytes + the whole words (ids fixed by construction);
- ChatML specials: ``<|endoftext|>`` (pad, id 0), ``<|im_start|>`` (id 1), ``<|im_end|>`` (EOS, id 2),
  and a ChatML chat template.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN)

# Whole-word tokens: the words of the prompt template and of the chat roles, so a synthetic prompt
# stays around 36 tokens. Order matters only for the ids; the split prefers the longest match.
WORD_TOKENS = (
    "What",
    " is",
    "Please",
    " Please",
    " reason",
    " step",
    " by",
    " and",
    " put",
    " your",
    " final",
    " answer",
    " within",
    "\\boxed",
    "system",
    "user",
    "assistant",
)

# Qwen's ChatML form (no default system prompt, no tools, no thinking tags).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

_REGEX_SPECIAL = set(r".^$*+?()[]{}|\-/")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (the one ByteLevel uses)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _escape(s: str) -> str:
    return "".join("\\" + c if c in _REGEX_SPECIAL else c for c in s)


def _build_backend() -> Tokenizer:
    byte_char = _bytes_to_unicode()
    words = ["".join(byte_char[b] for b in w.encode("utf-8")) for w in WORD_TOKENS]
    vocab: dict[str, int] = {}
    for tok in (*SPECIAL_TOKENS, *(byte_char[b] for b in range(256)), *words):
        if tok in vocab:
            raise AssertionError(f"duplicate token {tok!r} in the synthetic vocabulary")
        vocab[tok] = len(vocab)
    # After the byte-level map every piece is a string of byte characters; the pattern takes a whole
    # word when one starts here (longest first) and a single byte character otherwise.
    pattern = "|".join(_escape(w) for w in sorted(words, key=lambda w: (-len(w), w))) + "|."
    backend = Tokenizer(models.WordLevel(vocab, unk_token=PAD_TOKEN))  # unk never happens: all bytes are in
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return backend


def build_synthetic_tokenizer(save_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """The synthetic tokenizer (276 tokens: 3 specials, 256 bytes, 17 words), identical on every call.

    pad = ``<|endoftext|>`` (0), ``<|im_start|>`` (1), EOS = ``<|im_end|>`` (2); no BOS. With ``save_dir``
    it is also written there (``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``) and
    loads back offline with ``AutoTokenizer.from_pretrained(save_dir)``.
    """
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_build_backend(),
        pad_token=PAD_TOKEN,
        eos_token=IM_END_TOKEN,
        additional_special_tokens=[IM_START_TOKEN, IM_END_TOKEN],  # "extra_special_tokens" in transformers 5
        clean_up_tokenization_spaces=False,  # the default cleanup rewrites " ." -> "." and breaks round trips
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def decode_responses(tokenizer, batch: list[list[int]]) -> list[str]:
    """``[tokenizer.decode(ids, skip_special_tokens=True) for ids in batch]``, in one call to the Rust
    tokenizer's ``decode_batch`` where the result is the same (a fast tokenizer whose decode does no
    Python post-processing: no ``clean_up_tokenization_spaces``), which decodes on all of its threads
    (``RAYON_NUM_THREADS``) instead of one Python call per response."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    cleanup = getattr(tokenizer, "clean_up_tokenization_spaces", False)
    if backend is not None and (not cleanup or type(backend.model).__name__ == "BPE"):
        return backend.decode_batch([ids if isinstance(ids, list) else list(ids) for ids in batch],
                                    skip_special_tokens=True)
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in batch]
