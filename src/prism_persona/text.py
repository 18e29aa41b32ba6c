"""Text checks shared by training and evaluation."""

from __future__ import annotations

import re

_WORD = re.compile(r"\w+", re.U)


def word_set(text: str) -> frozenset:
    """The lower-cased words of ``text`` (for near-duplicate checks)."""
    return frozenset(re.findall(r"[a-z0-9']+", text.lower()))


def jaccard(a: frozenset, b: frozenset) -> float:
    """Word-set overlap |a & b| / |a | b| (0 when either is empty)."""
    return len(a & b) / len(a | b) if a and b else 0.0


def is_loop(text: str, min_repeats: int = 4, max_n: int = 8) -> bool:
    """True when the text repeats the same 1..``max_n``-word phrase ``min_repeats`` times in a row
    (``"word, word, word, word"``, a sentence over and over): a degenerate, looping answer."""
    words = [w.lower() for w in _WORD.findall(text)]
    for n in range(1, max_n + 1):
        need = n * min_repeats
        for start in range(0, len(words) - need + 1):
            gram = words[start : start + n]
            if all(words[start + k * n : start + (k + 1) * n] == gram for k in range(1, min_repeats)):
                return True
    return False
