"""Errors a user can cause. The CLI prints them as one line and exits 2, never with a traceback."""

from __future__ import annotations


class PrismError(Exception):
    """A mistake in the user's input: a bad flag, a missing file, a malformed config or data file.

    The message must say what is wrong and, where it helps, what to do instead. Anything that is not a
    ``PrismError`` is a bug in PRISM and keeps its traceback.
    """


class ConfigMismatchError(PrismError):
    """A run directory holds records made with settings that the current command would change."""
