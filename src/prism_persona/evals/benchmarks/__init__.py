"""The built-in benchmarks: importing a module registers it (``evals.base.register``), one line each.

A new benchmark is one more module here and one more line below (see ``evals/base.py``). A benchmark of
another package is one module there and one line in that package's metadata: an entry point in the
group ``prism_persona.benchmarks`` naming the module (``toy = my_package.toy``), which
:func:`load_plugins` imports (so its ``@register`` runs) when ``prism eval`` or ``prism study`` reads
``--benchmarks`` and ``--data``.
"""

from __future__ import annotations

from ...plugins import BENCHMARK_GROUP
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

GROUP = BENCHMARK_GROUP
"""The entry-point group of benchmarks from other packages (each entry names the module that registers one)."""


def load_plugins() -> list[str]:
    """Import every module named in the :data:`GROUP` entry points (its ``@register`` line adds its
    benchmark to :data:`REGISTRY` on the first import; later calls find it imported); returns the entry
    names. A module that fails to import is a one-line error naming the entry and its package
    (:mod:`prism_persona.plugins`, the same for every kind of plug-in)."""
    from ...plugins import load_group

    return [name for name, _ in load_group(GROUP)]
