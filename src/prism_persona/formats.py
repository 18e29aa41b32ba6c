"""Versions of the files PRISM writes and reads back: ``RUN/config.json`` (and any config file, same
layout), an artifact's ``prism_config.json`` and a gate's ``gate_config.json``.

Each file carries ``format_version``; a file without it is version 1 (the layout before the field
existed). Reading a file runs its migrations, one function per version step (``migrations[n]`` turns
version ``n`` into ``n + 1``), up to the version this library writes. A file newer than that is a
one-line :class:`PrismError`: an older PRISM never guesses at a layout it does not know. Standard
library only; migrations edit plain data and never run code from the file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import PrismError

FIELD = "format_version"


@dataclass(frozen=True)
class FileFormat:
    what: str
    """How a message names the file, e.g. "run config"."""
    current: int
    """The version this library writes."""
    migrations: dict[int, Callable[[dict], dict]] = field(default_factory=dict)
    """``n -> step``: the step turns a version-``n`` dict into a version-``n + 1`` dict."""


RUN_CONFIG = FileFormat("config file", 1)
"""``RUN/config.json`` and ``--config`` files (version 1: the RunConfig sections as in config.py)."""


def _artifact_v1_to_v2(data: dict) -> dict:
    """Version 1 (one adapter) is version 2 without ``personas``: nothing to change."""
    return dict(data)


ARTIFACT_CONFIG = FileFormat("artifact config", 2, {1: _artifact_v1_to_v2})
"""An artifact's ``prism_config.json`` (version 1: base_model, model_kind, adapter, gate files,
threshold, prism_version and the run's settings; version 2 adds ``personas``: one adapter per persona
in PEFT's multi-adapter layout). A one-adapter artifact is still written as version 1, so an older
PRISM reads it; a multi-adapter one is version 2, so an older PRISM refuses it instead of loading the
root adapter only."""

SINGLE_ADAPTER_VERSION = 1
"""The ``format_version`` a one-adapter artifact's ``prism_config.json`` is written with."""


def _gate_v1_to_v2(data: dict) -> dict:
    """Version 1 (the binary gate) is version 2 without ``personas``: nothing to change."""
    return dict(data)


GATE_CONFIG = FileFormat("gate config", 2, {1: _gate_v1_to_v2})
"""A gate's ``gate_config.json`` (``RUN/gate/`` and inside an artifact; version 1: hidden_size,
hidden_sizes, pooling, threshold, the optional ``ood`` abstain region, the optional ``temperature`` and
the training info; version 2 adds ``personas`` (a list of K >= 2 entries: the K-way gate) and
``min_confidence``). A binary gate is still written as version 1, so an older PRISM reads it."""

BINARY_GATE_VERSION = 1
"""The ``format_version`` a binary (K = 1) gate's ``gate_config.json`` is written with."""


def version_of(data: dict, fmt: FileFormat, where: str) -> int:
    """The ``format_version`` of ``data`` (1 when absent); a one-line error for a bad or too new one."""
    version = data.get(FIELD, 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise PrismError(f"{where}: {FIELD} must be a positive integer, got {version!r}")
    if version > fmt.current:
        raise PrismError(
            f"{where} has {FIELD} {version}, newer than this PRISM reads ({fmt.current}); upgrade prism-persona"
        )
    return version


def upgrade(data: dict, fmt: FileFormat, where: str) -> dict:
    """``data`` migrated step by step to ``fmt.current``, with ``format_version`` set to it."""
    version = version_of(data, fmt, where)
    out = dict(data)
    while version < fmt.current:
        out = fmt.migrations[version](out)
        version += 1
    out[FIELD] = fmt.current
    return out


def stamp(data: dict, fmt: FileFormat, version: int | None = None) -> dict:
    """``data`` with the ``format_version`` this library writes (``version``: an older one whose layout
    ``data`` still has, so that an older reader accepts it)."""
    return {**data, FIELD: fmt.current if version is None else int(version)}
