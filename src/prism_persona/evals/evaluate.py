"""``evaluate``: every system on every chosen benchmark, judged, summarised with bootstrap CIs.

Each benchmark is one module in ``evals/benchmarks/`` (a registered :class:`~prism_persona.evals.base.Benchmark`
with its :class:`~prism_persona.evals.base.Evaluator`). Returns ``(results, per_item)``: ``results`` is what
``results.json`` holds (every number a CI dict ``{mean, lo, hi, n}``); ``per_item[bench][system][item_id]``
is the per-item value behind each mean (MMLU correctness, MT-Bench mean turn score, safety refusal), used
by the study for paired lifts, and ``per_item["gate"][system][bench][item_id]`` the gate's decision on
each gated answer (a record of :mod:`.gates`; a bare probability in files written before it), used by
Table 1, Figure 4 and the threshold sweep.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

from .base import Benchmark
from .benchmarks import REGISTRY
from .runner import EvalRunner
from .systems import SystemSpec

log = logging.getLogger(__name__)


class Benchmarks:
    """The loaded items of each registered benchmark, by name (absent or empty = not evaluated):
    ``Benchmarks(mmlu=[...], safety={"pku": [...]})``; ``bench.mmlu`` reads them back (``None`` when absent)."""

    def __init__(self, **items):
        unknown = sorted(set(items) - set(REGISTRY))
        if unknown:
            raise ValueError(f"unknown benchmark(s) {', '.join(unknown)}; registered: {', '.join(REGISTRY)}")
        self.items = {name: items[name] for name in REGISTRY if items.get(name)}

    def __getattr__(self, name: str):
        if name in REGISTRY:
            return self.__dict__.get("items", {}).get(name)
        raise AttributeError(name)

    def __iter__(self) -> Iterator[tuple[Benchmark, object]]:
        """(benchmark, items) of every loaded benchmark, in registration order."""
        return ((REGISTRY[name], items) for name, items in self.items.items())

    def counts(self) -> dict:
        return {k: v for bench, items in self for k, v in bench.counts(items).items()}


def systems_to_run(specs: Sequence[SystemSpec]) -> list[SystemSpec]:
    """Systems to actually run: oracle needs base and lora; base is always run (win rates are vs base)."""
    names = {s.name for s in specs}
    out = [s for s in specs if s.kind != "oracle"]
    extra = [SystemSpec("base")] if "base" not in names else []
    if any(s.kind == "oracle" for s in specs) and "lora" not in names:
        extra.append(SystemSpec("lora"))
    return extra + out


def evaluate(
    runner: EvalRunner, specs: Sequence[SystemSpec], bench: Benchmarks, pairwise: bool = True
) -> tuple[dict, dict]:
    """Generate (cached), judge (cached) and summarise. See the module docstring for the shapes."""
    run_specs = systems_to_run(specs)
    results: dict = {
        "systems": [s.name for s in specs],
        "counts": bench.counts(),
        "n_resamples": runner.s.resamples,
        "seed": runner.s.seed,
    }
    per_item: dict = {}
    gates: dict = {}  # gated system -> benchmark -> item_id -> gate record (Table 1, the threshold sweep)
    generated = [s for s in specs if s.kind != "answers"]  # file answers exist for some benchmarks only
    gen_run = [s for s in run_specs if s.kind != "answers"]
    extras: dict = {}
    for benchmark, items in bench:
        to_run, shown = (run_specs, specs) if benchmark.answers_from_files else (gen_run, generated)
        evaluator = benchmark.evaluator(pairwise)
        results[benchmark.name], per_item[benchmark.name], found = evaluator.evaluate(runner, to_run, shown, items)
        for system, by_set in found.items():
            gates.setdefault(system, {}).update(by_set)
        extras.update(benchmark.extras(runner))
    if gates:
        per_item["gate"] = gates
    if runner._judge is not None:
        results["judge"] = runner.judge.identity
    results.update(extras)
    results["work"] = vars(runner.count).copy()
    return results, per_item
