"""``evaluate``: every system on every chosen benchmark, judged, summarised with bootstrap CIs.

Each benchmark is one :class:`~prism_persona.evals.base.Evaluator` (``evals/mmlu.py``,
``evals/mtbench.py``, ``evals/safety.py``). Returns ``(results, per_item)``: ``results`` is what
``results.json`` holds (every number a CI dict ``{mean, lo, hi, n}``); ``per_item[bench][system][item_id]``
is the per-item value behind each mean (MMLU correctness, MT-Bench mean turn score, safety refusal), used
by the study for paired lifts, and ``per_item["gate"][system][bench][item_id]`` the gate probability of
each gated answer, used by the threshold sweep.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from .mmlu import MMLUEvaluator
from .mtbench import MTBenchEvaluator
from .runner import EvalRunner
from .safety import SafetyEvaluator
from .systems import SystemSpec

log = logging.getLogger(__name__)


@dataclass
class Benchmarks:
    """The loaded items of each benchmark (empty = not evaluated)."""

    mmlu: list = field(default_factory=list)
    mtbench: list = field(default_factory=list)
    safety: dict = field(default_factory=dict)  # name -> list[SafetyItem]

    def counts(self) -> dict:
        out = {}
        if self.mmlu:
            out["mmlu"] = len(self.mmlu)
        if self.mtbench:
            out["mtbench"] = len(self.mtbench)
        for k, v in self.safety.items():
            out[k] = len(v)
        return out


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
    gates: dict = {}  # gated system -> benchmark -> item_id -> gate probability (for the threshold sweep)
    generated = [s for s in specs if s.kind != "answers"]  # file answers exist for MT-Bench only
    gen_run = [s for s in run_specs if s.kind != "answers"]
    plan = [
        (MMLUEvaluator(), bench.mmlu, gen_run, generated),
        (MTBenchEvaluator(pairwise), bench.mtbench, run_specs, specs),
        (SafetyEvaluator(), bench.safety, gen_run, generated),
    ]
    for evaluator, items, to_run, shown in plan:
        if items:
            results[evaluator.name], per_item[evaluator.name] = evaluator.evaluate(runner, to_run, shown, items, gates)
    if gates:
        per_item["gate"] = gates
    if runner._judge is not None:
        results["judge"] = runner.judge.identity
    if bench.safety:
        results["refusal_classifier"] = runner.refusal.identity
    results["work"] = vars(runner.count).copy()
    return results, per_item
