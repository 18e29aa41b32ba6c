"""The built-in benchmarks: importing a module registers it (``evals.base.register``), one line each.

A new benchmark is one more module here and one more line below (see ``evals/base.py``). A benchmark of
another package is one module there and one line in that package's metadata: an entry point in the
group ``prism_persona.benchmarks`` naming the module (``toy = my_package.toy``), which
:func:`load_plugins` imports (so its ``@register`` runs) when ``prism eval`` or ``prism study`` reads
``--benchmarks`` and ``--data``.
"""

from __future__ import annotations

import logging

from ...errors import PrismError
from ..base import REGISTRY, Benchmark, CategoryPersona, category_persona, hub_dataset, owner, register
from . import mmlu, mtbench, refusal_set, safety, xstest  # noqa: F401  (registration)

__all__ = [
    "GROUP",
    "REGISTRY",
    "Benchmark",
    "CategoryPersona",
    "category_persona",
    "hub_dataset",
    "load_plugins",
    "owner",
    "register",
]

log = logging.getLogger(__name__)

GROUP = "prism_persona.benchmarks"
"""The entry-point group of benchmarks from other packages (each entry names the module that registers one)."""


def load_plugins() -> list[str]:
    """Import every module named in the :data:`GROUP` entry points (its ``@register`` line adds its
    benchmark to :data:`REGISTRY` on the first import; later calls find it imported); returns the entry
    names. A module that fails to import is a one-line error naming the entry and its package."""
    from importlib.metadata import entry_points

    done = []
    for ep in entry_points(group=GROUP):
        try:
            ep.load()
        except Exception as exc:  # the plugin's own import error: say whose it is
            where = f" (package {ep.dist.name})" if getattr(ep, "dist", None) else ""
            raise PrismError(
                f"benchmark entry point '{ep.name} = {ep.value}'{where} failed to import: {type(exc).__name__}: {exc}"
            ) from None
        log.debug("benchmark plugin %s loaded from %s", ep.name, ep.value)
        done.append(ep.name)
    return done
