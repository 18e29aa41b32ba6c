"""The benchmark contract: one benchmark = one module with a :class:`Benchmark` (everything PRISM knows
about it: its names, its hub datasets, how to load its items, its per-item categories and the personas
that match them, the settings it alone reads, its report rows) registered with ``@register``, and an
:class:`Evaluator` (one method) that runs and grades it.

Add a benchmark by writing ``evals/benchmarks/<name>.py`` and importing it in
``evals/benchmarks/__init__.py`` (the one registration line), or, from another package, by writing its
module there and naming it in that package's ``prism_persona.benchmarks`` entry point (the one line;
:func:`prism_persona.evals.benchmarks.load_plugins`). Nothing else names a benchmark: the hub table,
the persona matching, ``--benchmarks``, ``--data NAME=PATH``, the report and Table 1 look it up here.
``Evaluator.evaluate`` receives the runner (engines, judge, cache: ``runner.responses_for``
for cached generation, ``runner.judged`` for cached judging), the systems to run (base always, lora when
oracle is shown), the systems to report and the items. It returns ``(summary, per_item, gates)``: the
section of ``results.json`` (``{system: {...}}``), ``{system: {item_id: value}}``, and each gated
system's gate decision per item, ``{system: {set: {item_id: record}}}`` (:func:`keep_gates`; the record
of :mod:`.gates`), for Table 1, Figure 4 and the threshold sweep.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, Optional

from .format import fmt_ci, md_table, present
from .gates import record as gate_record
from .gates import scored_with_meta
from .runner import EvalRunner, Job
from .sources import HubDataset
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
    """Store the gate's decision on each item a gated system answered (its first turn's; a record of
    :mod:`.gates`: probability, routed, abstained, outside, persona)."""
    if spec.kind != "prism":
        return
    recs = {}
    for iid, meta in metas.items():
        rec = gate_record(meta[0] if isinstance(meta, list) and meta else meta)
        if rec is not None:
            recs[iid] = rec
    if recs:
        gates.setdefault(spec.name, {})[bench] = recs


def scored(engine, chats, choices, gated: bool) -> tuple[Optional[list], list[dict]]:
    """``(scores, routing meta)`` of scored prompts (nothing generated): for a ``gated`` system the meta of
    the decision each row was scored with, as a gated engine's completion reports it
    (:func:`.gates.scored_with_meta`: one decision per row), else ``{}`` per chat. Scores ``None``: the
    engine cannot score."""
    if gated:
        return scored_with_meta(engine, chats, choices)
    return engine.score_choices(chats, list(choices)), [{} for _ in chats]


class CategoryPersona(NamedTuple):
    """The persona of one item category: the persona domains that match it (best first; a domain matches
    when its name equals a candidate or contains it, case ignored), and the field of the built-in
    expert persona used when no domain does."""

    field: str
    domains: tuple


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
    hub: dict[str, HubDataset] = {}
    """``{source: HubDataset}``: where each of its members' rows come from when no local copy is given
    (a source is a member, or the benchmark's name when one dataset holds all its members)."""
    personas: dict[str, CategoryPersona] = {}
    """``{category: CategoryPersona}`` for the categories its items are matched to a persona by (what
    :meth:`categories` and the evaluator pass to ``runner.chat_for``); a category no benchmark lists
    matches the domain of its own name and gets a generic expert persona in its own name."""
    options: tuple = ()
    """The :class:`~prism_persona.evals.settings.EvalConfig` fields only this benchmark reads (its data
    path, filters, limits, token budgets); a test holds every other module off them."""

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


class AnsweredBenchmark(Benchmark):
    """A benchmark that asks one question per item and grades each answer itself: a subclass writes
    ``name``, :meth:`load`, :meth:`prompt` and :meth:`grade` (and, to choose matched personas, items with
    a ``category`` and ``personas`` for those categories); its evaluator (:class:`GradedAnswers`), its
    categories, its report section and its routing rows come with this class."""

    title: str = ""
    """Its heading in ``report.md`` (default: its name)."""
    max_tokens = 64
    """New tokens of one (greedy) answer."""

    @abc.abstractmethod
    def prompt(self, item) -> str:
        """The user message that asks ``item``."""

    @abc.abstractmethod
    def grade(self, item, answer: str) -> float:
        """The value of one answer (1.0 / 0.0 for right / wrong; any number for a score)."""

    def category(self, member: str, item) -> str:
        """The category an item is reported and matched to a persona by (its ``category``, else its member)."""
        return getattr(item, "category", "") or member

    def categories(self, items):
        return {m: {it.item_id: self.category(m, it) for it in group} for m, group in self.groups(items).items()}

    def evaluator(self, pairwise: bool) -> Evaluator:
        return GradedAnswers(self)

    def markdown(self, results, figures):
        section = results[self.name]
        systems = present(section, results["systems"])
        members = [m for m in self.members if any(m in section[s] for s in systems)]
        rows = [[s] + [fmt_ci(section[s].get(m, {}).get("value"), pct=self.percent) for m in members] for s in systems]
        return [f"## {self.title or self.name}", "", md_table(["system"] + [self.label(m) for m in members], rows), ""]

    def figures(self, results, out):
        return {}

    def routing_rows(self, section):
        return [(self.label(m), v["routing"]) for m, v in section.items() if v.get("routing")]


class GradedAnswers(Evaluator):
    """The evaluator of an :class:`AnsweredBenchmark`: each system's greedy answer to every item (cached,
    with its matched persona), graded by the benchmark; ``{system: {member: {"value": CI[, "routing": CI]}}}``
    and per item the grade. The oracle takes per item the better of base and lora."""

    def __init__(self, bench: AnsweredBenchmark):
        self.bench = bench
        self.name = bench.name

    def evaluate(self, runner, run_specs, specs, items):
        bench = self.bench
        gates: dict = {}
        groups = bench.groups(items)
        cats = bench.categories(items)
        out: dict = {s.name: {} for s in specs}
        per: dict = {s.name: {} for s in specs}
        for member, group in groups.items():
            vals: dict = {}
            routed: dict = {}
            for spec in run_specs:
                recs = self._answers(runner, spec, member, group, cats[member])
                vals[spec.name] = {it.item_id: float(bench.grade(it, recs[it.item_id]["response"])) for it in group}
                metas = {it.item_id: recs[it.item_id].get("meta") for it in group}
                routed[spec.name] = runner.routing([(member, [m]) for m in metas.values()]).get(member)
                keep_gates(gates, spec, member, metas)
            if oracle_wanted(specs):
                best = max if bench.higher_is_better(member) else min
                vals["oracle"] = {i: best(vals["base"][i], vals["lora"][i]) for i in vals["base"]}
            for spec in specs:
                entry = {"value": runner.ci(list(vals[spec.name].values()))}
                if spec.kind == "prism" and routed.get(spec.name):
                    entry["routing"] = routed[spec.name]
                out[spec.name][member] = entry
                per[spec.name].update(vals[spec.name])
        return out, per, gates

    def _answers(self, runner, spec, member: str, group, cats: dict) -> dict[str, dict]:
        bench = self.bench
        jobs = []
        for it in group:
            message = [{"role": "user", "content": bench.prompt(it)}]
            chat, persona, domain = runner.chat_for(spec, cats[it.item_id], it.item_id, message)
            key = runner.key(spec, bench.name, it.item_id, persona, {"tokens": bench.max_tokens})
            jobs.append(Job(it.item_id, key, chat, domain))

        def run_chunk(engine, chunk):
            outs = engine.generate([j.payload for j in chunk], runner.gen(bench.max_tokens))
            runner.count.generated += len(chunk)
            return [{"response": o.text, "meta": runner.meta(o)} for o in outs]

        return runner.responses_for(spec, member, jobs, run_chunk)


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


def hub_dataset(source: str) -> Optional[HubDataset]:
    """The hub dataset a registered benchmark declares for ``source`` (a member or a benchmark name)."""
    return next((b.hub[source] for b in REGISTRY.values() if source in b.hub), None)


def category_persona(category: str) -> Optional[CategoryPersona]:
    """The persona a registered benchmark declares for one of its categories (the first one to list it)."""
    return next((b.personas[category] for b in REGISTRY.values() if category in b.personas), None)
