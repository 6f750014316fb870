"""Math answers as text: the last ``\\boxed{}`` answer of a response, its normalized form, the cheap checks.

Everything here is decided without math-verify, in linear time: ``extract_answer`` pulls the answer out of
a response, ``normalize_answer`` gives the meaning-preserving form used as the fast-path key, the cache
key and math-verify's input, and ``_fast_verdict`` settles a pair when the normalized strings or plain
integers already decide it, or when an answer is over the caps (``MAX_ANSWER_CHARS``,
``MAX_NESTING_DEPTH``) and so compared as a string only. What is left goes to the timed math-verify
comparison (``tempo_mega.rewards.comparisons``); the whole design is in ``tempo_mega.rewards.math``.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

MAX_ANSWER_CHARS = 1000
"""Longer answers are compared as strings only (math-verify's parse time grows with length)."""

MAX_NESTING_DEPTH = 12
"""Deeper ``{([`` nesting is compared as strings only (parse time is exponential in brace depth)."""

LENIENT_REL_TOL = 2e-3
"""Relative tolerance of the lenient numeric comparison (the published grader's ~2e-3)."""

LENIENT_ROUND_DECIMALS = 6
"""Both values are rounded to this many decimals before the lenient comparison (math-verify's
``float_rounding``); it acts as an absolute tolerance of 5e-7 near zero."""


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BOX_TOKEN_RE = re.compile(r"[ \t]+([^\s${}]+)")


def _braced_content(text: str, open_idx: int) -> str | None:
    """Content of the brace group opening at ``text[open_idx] == "{"``, or None if unbalanced.

    A backslash escapes the next character, so ``\\{``/``\\}`` do not count as group braces.
    """
    depth = 0
    i = open_idx
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_idx + 1 : i]
        i += 1
    return None


def extract_answer(solution: str) -> str | None:
    """The content of the last ``\\boxed{...}`` or ``\\fbox{...}`` of ``solution``.

    Nested braces are matched (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``). ``\\boxed 5`` (a
    space and one token, as many graders accept) gives ``5``, without trailing ``.,;``. The last
    box decides: if its braces never close (a truncated response), the result is None even when an
    earlier box is complete. An empty box gives ``""``, which never grades as correct. No box, or
    a non-string argument, gives None. Never raises; linear in ``len(solution)``.
    """
    if not isinstance(solution, str):
        return None
    last = None
    for last in _BOX_RE.finditer(solution):  # noqa: B007 - only the last match is wanted
        pass
    if last is None:
        return None
    rest = last.end()
    brace = rest
    while brace < len(solution) and solution[brace] in " \t":
        brace += 1
    if brace < len(solution) and solution[brace] == "{":
        content = _braced_content(solution, brace)
        return None if content is None else content.strip()
    token = _BOX_TOKEN_RE.match(solution, rest)
    if token is None:
        return None
    return token.group(1).rstrip(".,;:") or None


# --------------------------------------------------------------------------------------------
# Normalization and cheap checks
# --------------------------------------------------------------------------------------------

# Scanned left to right so that "\\\\" (a LaTeX line break) is one token and never read as an
# escape of the character after it.
_ESCAPE_OR_SPACING_RE = re.compile(r"\\\\|\\\$|\$|\\[,;:! ]")
_LEFT_RIGHT_DOT_RE = re.compile(r"\\(?:left|right)\.")
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_FRAC_VARIANT_RE = re.compile(r"\\[dt]frac(?![A-Za-z])")
_SPACE_RE = re.compile(r"\s+")
# A space matters only between two letters ("\pi r", "a b"); elsewhere LaTeX ignores it.
_INSIGNIFICANT_SPACE_RE = re.compile(r"(?<![A-Za-z]) | (?![A-Za-z])")
_PLAIN_INT_RE = re.compile(r"[+-]?[0-9]+")


def _drop_dollar_or_spacing(match: re.Match) -> str:
    token = match.group(0)
    if token in ("\\\\", "\\$"):  # line break, escaped dollar: kept
        return token
    return "" if token == "$" else " "  # math-mode delimiter: dropped; thin space: a space


def normalize_answer(answer: str) -> str:
    """Meaning-preserving cleanup used as the fast-path key, the cache key, and math-verify's input:
    no ``$``, no ``\\left``/``\\right``, ``\\dfrac``/``\\tfrac`` -> ``\\frac``, no thin spaces, no
    insignificant whitespace, no trailing period."""
    s = _ESCAPE_OR_SPACING_RE.sub(_drop_dollar_or_spacing, answer)
    s = _LEFT_RIGHT_DOT_RE.sub("", s)
    s = _LEFT_RIGHT_RE.sub("", s)
    s = _FRAC_VARIANT_RE.sub(r"\\frac", s)
    s = _SPACE_RE.sub(" ", s).strip()
    s = _INSIGNIFICANT_SPACE_RE.sub("", s)
    return s.rstrip(".")


def _nesting_depth(s: str) -> int:
    depth = deepest = 0
    for ch in s:
        if ch in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "})]":
            depth = max(0, depth - 1)
    return deepest


def _too_complex(s: str) -> bool:
    return len(s) > MAX_ANSWER_CHARS or _nesting_depth(s) > MAX_NESTING_DEPTH


def _lenient_close(a: Any, b: Any) -> bool:
    """|a - b| <= LENIENT_REL_TOL * max(|a|, |b|) after rounding both to LENIENT_ROUND_DECIMALS.

    Works on ints/Fractions (exact) and sympy Floats alike."""
    a, b = round(a, LENIENT_ROUND_DECIMALS), round(b, LENIENT_ROUND_DECIMALS)
    tol = Fraction(LENIENT_REL_TOL) if isinstance(a, (int, Fraction)) else LENIENT_REL_TOL
    return bool(abs(a - b) <= tol * max(abs(a), abs(b)))


def _fast_verdict(pred: str, gold: str, lenient: bool) -> bool | None:
    """The verdict of the cheap checks (strings, plain integers, the caps), or None when math-verify
    must decide."""
    if not isinstance(pred, str) or not isinstance(gold, str):
        return False
    p, g = normalize_answer(pred), normalize_answer(gold)
    if not p or not g:
        return False
    if p == g:
        return True
    if _PLAIN_INT_RE.fullmatch(p) and _PLAIN_INT_RE.fullmatch(g):
        a, b = int(p), int(g)
        return a == b or (lenient and _lenient_close(a, b))
    if _too_complex(p) or _too_complex(g):
        return False
    return None
