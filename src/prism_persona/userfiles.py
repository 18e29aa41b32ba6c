"""Reading the files a user names (config, queries, prompts, benchmark data): UTF-8 text and JSON Lines,
with one-line :class:`~prism_persona.errors.PrismError` messages. Standard library only."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import PrismError


def read_user_text(path, what: str) -> str:
    """A file the user named, as text (UTF-8; a leading BOM dropped). A missing file or one in another
    encoding is a one-line :class:`PrismError` naming ``what`` (e.g. "queries file") and the path."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise PrismError(f"{what} not found: {path}")
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PrismError(f"{what} {p} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None


def jsonl_rows(text: str, invalid: Callable[[int, str], str]) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of each non-blank line of JSON Lines ``text``; a line that is not JSON
    is a :class:`PrismError` with the message ``invalid(line number, reason)``.

    Records end at ``"\\n"`` only: ``str.splitlines()`` would also split inside a string at U+0085 or
    U+2028 (``json.loads`` rejects a raw newline inside a string, so ``"\\n"`` is always a boundary)."""
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PrismError(invalid(n, exc.msg)) from None
        except RecursionError:  # [[[[... nested deeper than Python's stack
            raise PrismError(invalid(n, "nested too deeply")) from None
        yield n, value


def csv_checked(path, rows: Iterable) -> Iterator:
    """The rows of a :mod:`csv` reader; malformed CSV (a field over the csv module's size limit, a NUL
    byte) is a one-line :class:`PrismError` naming the file."""
    import csv

    try:
        yield from rows
    except csv.Error as exc:
        raise PrismError(f"{path} is not valid CSV ({exc})") from None
