"""Text checks shared by training and evaluation."""

from __future__ import annotations

import re
from collections.abc import Sequence

_WORD = re.compile(r"\w+", re.U)


def word_set(text: str) -> frozenset:
    """The lower-cased words of ``text`` (for near-duplicate checks)."""
    return frozenset(re.findall(r"[a-z0-9']+", text.lower()))


def jaccard(a: frozenset, b: frozenset) -> float:
    """Word-set overlap |a & b| / |a | b| (0 when either is empty)."""
    return len(a & b) / len(a | b) if a and b else 0.0


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table: the header, the separator, one line per row (cells as ``str``)."""
    out = ["| " + " | ".join(str(c) for c in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


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


_UNSAFE_CHARS = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x84\x86-\x9f"  # C0 (but tab, newline), DEL, C1 (but NEL): ESC, CSI among them
    "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"  # bidi marks, overrides and isolates
    "\u200b-\u200d\u2060\ufeff]"  # zero-width space, (non-)joiner, word joiner, BOM
)
_TEMPLATE_TOKENS = re.compile(
    r"<\|[^<>|\s]{1,40}\|>"  # <|im_start|>, <|im_end|>, <|endoftext|>, <|eot_id|>, <|start_header_id|> ...
    r"|\[/?INST\]|<</?SYS>>|</?s>|<(?:start|end)_of_turn>|<\|?(?:bos|eos|pad|unk)\|?>",
    re.I,
)


def unsafe_text_reason(text: str, special_tokens: tuple[str, ...] = ()) -> str:
    """Why ``text`` is unsafe to feed a model as a user turn, or ``""``: a control character (NUL,
    the ESC of an ANSI escape, any other C0/C1 character but the line breaks tab, newline, CR LF, NEL;
    U+2028/2029 are line breaks too and allowed), a bidi override or
    isolate, a zero-width character, or a chat-template token (``<|im_start|>``, ``[INST]``, ... and
    any of ``special_tokens``, the tokenizer's own, when the caller has them). Shared by the query
    filter (generated queries) and the ``--queries-file`` reader (user queries)."""
    m = _UNSAFE_CHARS.search(text.replace("\r\n", "\n"))
    if m:
        return f"control or invisible character U+{ord(m.group()):04X}"
    m = _TEMPLATE_TOKENS.search(text)
    if m:
        return f"chat-template token {m.group()!r}"
    for tok in special_tokens:
        if tok and tok in text:
            return f"special token {tok!r}"
    return ""
