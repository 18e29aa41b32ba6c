"""The benchmark contract: one benchmark = one module in ``evals/benchmarks/`` with a :class:`Benchmark`
(what PRISM knows about it: its names, how to load its items, its per-item categories, its report rows)
registered with ``@register``, and an :class:`Evaluator` (one method) that runs it.

Add a benchmark by writing ``evals/benchmarks/<name>.py`` and importing it in
``evals/benchmarks/__init__.py`` (the one registration line). ``Evaluator.evaluate`` receives the runner (engines, judge, cache: ``runner.responses_for``
for cached generation, ``runner.judged`` for cached judging), the systems to run (base always, lora when
oracle is shown), the systems to report and the items. It returns ``(summary, per_item, gates)``: the
section of ``results.json`` (``{system: {...}}``), ``{system: {item_id: value}}``, and each gated
system's gate probability per item, ``{system: {set: {item_id: p}}}`` (:func:`keep_gates`), for the
threshold sweep.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from .runner import EvalRunner
from .systems import SystemSpec


class Evaluator(abc.ABC):
    """One benchmark. ``name`` is its key in ``results.json``."""

    name: str = ""

    @abc.abstractmethod
    def evaluate(
        self, runner: EvalRunner, run_specs: Sequence[SystemSpec], specs: Sequence[SystemSpec], items
    ) -> tuple[dict, dict, dict]:
        """Generate (cached), judge (cached) and summarise ``items`` for ``specs``: ``(summary, per_item, gates)``."""


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


class Benchmark(abc.ABC):
    """Everything PRISM knows about one benchmark; ``name`` is its key in ``results.json`` and ``per_item.json``.

    Its items are what :meth:`load` returns (a list, or ``{set: [items]}`` for a family of sets); empty
    means not evaluated. The defaults fit a benchmark with one set scored per item.
    """

    name: str = ""
    sets: tuple = ()
    """The names ``--benchmarks`` accepts for it (default: its name); ``name`` itself then means all of them."""
    answers_from_files = False
    """Whether systems whose answers come from files (``--fastchat-answers``) run on it."""
    percent = True
    """Whether its value is a share (shown in percent) rather than a score."""
    accuracy_axis = False
    """Whether it is the x axis (accuracy) of the gate-threshold trade-off, against every other one."""
    default = True
    """Whether it runs when ``--benchmarks`` is not given (a benchmark without a hub dataset: no)."""

    @property
    def members(self) -> tuple:
        return self.sets or (self.name,)

    @staticmethod
    def data_path(cfg, member: str) -> Optional[str]:
        """The local copy of ``member``'s data the user gave (``--data NAME=PATH``, or the built-in named flag
        such as ``--pku``); ``None``: the benchmark's own default source."""
        return cfg.data.get(member) or getattr(cfg, member, None) or None

    @abc.abstractmethod
    def load(self, cfg, names: Sequence[str], limit: Optional[int]) -> Any:
        """The items of the chosen ``names`` (empty when none of its members is chosen)."""

    @abc.abstractmethod
    def evaluator(self, pairwise: bool) -> Evaluator:
        """The evaluator that runs it (``pairwise``: also judge win rates where the benchmark has them)."""

    @abc.abstractmethod
    def categories(self, items) -> dict[str, dict[str, str]]:
        """``{member: {item_id: category}}``: the per-category keys (the threshold sweep's rows)."""

    def groups(self, items) -> dict[str, list]:
        """``{member: [items]}`` (a family's items already are; a single set is its name's)."""
        return items if isinstance(items, dict) else {self.name: items}

    def counts(self, items) -> dict[str, int]:
        return {member: len(group) for member, group in self.groups(items).items()}

    def label(self, member: str) -> str:
        """The measured value of a member, as tables and figures name it (``"MMLU accuracy"``)."""
        return member

    def higher_is_better(self, member: str) -> bool:
        """Whether a higher value of a member is better (over-refusal: no); the sign of a persona's effect."""
        return True

    def study_label(self, member: str) -> str:
        """The row of a member in the study's effects table (default: :meth:`label`)."""
        return self.label(member)

    def study_items(self, items) -> dict[str, Optional[list]]:
        """``{member: item ids}`` the study's lifts are paired over (``None``: every item with a value)."""
        return {member: [it.item_id for it in group] for member, group in self.groups(items).items()}

    def extras(self, runner) -> dict:
        """Fields it adds to ``results.json`` beside its section (e.g. who decided refusals)."""
        return {}

    @abc.abstractmethod
    def markdown(self, results: dict, figures: dict) -> list[str]:
        """Its section of ``report.md`` (lines), from its ``results.json`` section."""

    @abc.abstractmethod
    def figures(self, results: dict, out: Path) -> dict[str, Path]:
        """Its PNG figures in ``out``: ``{name: path}``."""

    def routing_rows(self, section: dict) -> list[tuple[str, dict]]:
        """(category label, routed-share CI) of one gated system's results in its section."""
        return []


REGISTRY: dict[str, Benchmark] = {}
"""Every benchmark by name, in registration order (the order of reports and ``--benchmarks``)."""


def register(cls: type[Benchmark]) -> type[Benchmark]:
    """Class decorator: ``@register`` above a :class:`Benchmark` subclass adds it to :data:`REGISTRY`."""
    if cls.name in REGISTRY:
        raise ValueError(f"benchmark '{cls.name}' is registered twice")
    REGISTRY[cls.name] = cls()
    return cls


def owner(member: str) -> Benchmark:
    """The registered benchmark a member name (``mmlu``, ``pku``) belongs to."""
    return next(b for b in REGISTRY.values() if member in b.members)
