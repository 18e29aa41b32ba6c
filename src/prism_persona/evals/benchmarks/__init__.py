"""The built-in benchmarks: importing a module registers it (``evals.base.register``), one line each.

A new benchmark is one more module here and one more line below (see ``evals/base.py``).
"""

from ..base import REGISTRY, Benchmark
from . import mmlu, mtbench, refusal_set, safety, xstest  # noqa: F401  (registration)

__all__ = ["REGISTRY", "Benchmark"]
