"""Plug-ins from installed packages: one entry-point group per kind, read the same way for every kind.

A package adds an engine, a stage, a benchmark or a pairwise judge with one module and one line of its
metadata, e.g. in its ``pyproject.toml``::

    [project.entry-points."prism_persona.engines"]
    toy = "my_package.toy"          # the module declares ENGINE = EngineSpec(...)

Groups (:data:`GROUPS`): ``prism_persona.engines`` (a module declaring ``ENGINE``),
``prism_persona.stages`` (a module whose import calls ``stages.register``),
``prism_persona.benchmarks`` (a module whose import runs ``@register``) and ``prism_persona.judges``
(a pairwise judge function, ``--judge NAME``). The `prism` CLI imports the engines and stages when it
builds its parser (the ``--engine`` and ``--redo`` choices), the benchmarks when ``prism eval`` reads
``--benchmarks``, a judge when ``--judge`` names it. Only an installed package's code runs: nothing in a
config file or a run directory names a module to import. A plug-in that fails to import is a one-line
:class:`~prism_persona.errors.PrismError` naming the entry and its package. Standard library only.
"""

from __future__ import annotations

import logging
from typing import Any

from .errors import PrismError

ENGINE_GROUP = "prism_persona.engines"
STAGE_GROUP = "prism_persona.stages"
BENCHMARK_GROUP = "prism_persona.benchmarks"
JUDGE_GROUP = "prism_persona.judges"
GROUPS = {ENGINE_GROUP: "engine", STAGE_GROUP: "stage", BENCHMARK_GROUP: "benchmark", JUDGE_GROUP: "judge"}

log = logging.getLogger(__name__)


def entries(group: str) -> list:
    """The entry points of ``group`` in the installed packages (read on every call: a package installed
    or a path added since is seen)."""
    from importlib.metadata import entry_points

    return list(entry_points(group=group))


def load_entry(ep: Any, group: str) -> Any:
    """``ep.load()`` (the module or object it names); a failure is a one-line error naming the entry."""
    try:
        obj = ep.load()
    except Exception as exc:  # the plug-in's own import error: say whose it is
        where = f" (package {ep.dist.name})" if getattr(ep, "dist", None) else ""
        kind = GROUPS.get(group, "plug-in")
        raise PrismError(
            f"{kind} entry point '{ep.name} = {ep.value}'{where} failed to import: {type(exc).__name__}: {exc}"
        ) from None
    log.debug("%s plug-in %s loaded from %s", GROUPS.get(group, "plug-in"), ep.name, ep.value)
    return obj


def find_entry(group: str, name: str) -> Any:
    """The entry point ``name`` of ``group`` (None when no installed package declares it)."""
    return next((ep for ep in entries(group) if ep.name == name), None)


def load_group(group: str) -> list[tuple[str, Any]]:
    """Import every entry of ``group``: ``[(entry name, loaded object)]``."""
    return [(ep.name, load_entry(ep, group)) for ep in entries(group)]
