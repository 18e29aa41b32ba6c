"""The evaluator contract: one benchmark = one class with one method.

Add a benchmark by writing a module with an :class:`Evaluator` subclass and listing it in
``evals/evaluate.py``. ``evaluate`` receives the runner (engines, judge, cache: ``runner.responses_for``
for cached generation, ``runner.judged`` for cached judging), the systems to run (base always, lora when
oracle is shown), the systems to report, the items, and ``gates`` to fill with each gated system's gate
probability per item (``_keep_gates``) for the threshold sweep. It returns ``(summary, per_item)``:
the section of ``results.json`` (``{system: {...}}``) and ``{system: {item_id: value}}``.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

from .runner import EvalRunner
from .systems import SystemSpec


class Evaluator(abc.ABC):
    """One benchmark. ``name`` is its key in ``results.json``."""

    name: str = ""

    @abc.abstractmethod
    def evaluate(
        self, runner: EvalRunner, run_specs: Sequence[SystemSpec], specs: Sequence[SystemSpec], items, gates: dict
    ) -> tuple[dict, dict]:
        """Generate (cached), judge (cached) and summarise ``items`` for ``specs``."""


def oracle_wanted(specs: Sequence[SystemSpec]) -> bool:
    return any(s.kind == "oracle" for s in specs)


def keep_gates(gates: dict, spec: SystemSpec, bench: str, metas: dict) -> None:
    """Store the gate probability of each item a gated system answered (its first turn's decision)."""
    if spec.kind != "prism":
        return
    probs = {}
    for iid, meta in metas.items():
        m = meta[0] if isinstance(meta, list) and meta else meta
        if isinstance(m, dict) and "gate_prob" in m:
            probs[iid] = float(m["gate_prob"])
    if probs:
        gates.setdefault(spec.name, {})[bench] = probs


def route_meta(engine, chats) -> list[dict]:
    """Routing meta for scored prompts, when the engine exposes ``route(chats)`` (gated engines)."""
    fn = getattr(engine, "route", None) or getattr(getattr(engine, "gated", None), "route", None)
    if not callable(fn):
        return [{} for _ in chats]
    return [{"gate_prob": float(p), "routed": bool(r)} for p, r in fn(chats)]
