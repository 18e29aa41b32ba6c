"""Errors a user can cause. The CLI prints them as one line and exits 2, never with a traceback."""

from __future__ import annotations


class PrismError(Exception):
    """A mistake in the user's input: a bad flag, a missing file, a malformed config or data file.

    The message must say what is wrong and, where it helps, what to do instead. Anything that is not a
    ``PrismError`` is a bug in PRISM and keeps its traceback.
    """


class ConfigMismatchError(PrismError):
    """A run directory holds records made with settings that the current command would change."""


def read_user_text(path, what: str) -> str:
    """A file the user named, as text (UTF-8; a leading BOM dropped). A missing file or one in another
    encoding is a one-line :class:`PrismError` naming ``what`` (e.g. "queries file") and the path."""
    from pathlib import Path

    p = Path(path).expanduser()
    if not p.is_file():
        raise PrismError(f"{what} not found: {path}")
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PrismError(f"{what} {p} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
