"""``evaluate``: every system on every chosen benchmark, judged, summarised with bootstrap CIs.

Returns ``(results, per_item)``: ``results`` is what ``results.json`` holds (every number a CI dict
``{mean, lo, hi, n}``); ``per_item[bench][system][item_id]`` is the per-item value behind each mean
(MMLU correctness, MT-Bench mean turn score, safety refusal), used by the study for paired lifts.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from typing import Sequence

from . import mmlu as M
from .data import LETTERS, MMLUItem, MTBenchItem, SafetyItem, is_benign
from .runner import EvalRunner
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


def evaluate(runner: EvalRunner, specs: Sequence[SystemSpec], bench: Benchmarks,
             pairwise: bool = True) -> tuple[dict, dict]:
    """Generate (cached), judge (cached) and summarise. See the module docstring for the shapes."""
    run_specs = systems_to_run(specs)
    shown = [s.name for s in specs]
    results: dict = {"systems": shown, "counts": bench.counts(), "n_resamples": runner.s.n_resamples,
                     "seed": runner.s.seed}
    per_item: dict = {}
    gates: dict = {}  # gated system -> benchmark -> item_id -> gate probability (for the threshold sweep)
    generated = [s for s in specs if s.kind != "answers"]  # file answers exist for MT-Bench only
    gen_run = [s for s in run_specs if s.kind != "answers"]
    if bench.mmlu:
        results["mmlu"], per_item["mmlu"] = _eval_mmlu(runner, gen_run, generated, bench.mmlu, gates)
    if bench.mtbench:
        results["mtbench"], per_item["mtbench"] = _eval_mtbench(runner, run_specs, specs, bench.mtbench, pairwise,
                                                                gates)
    if bench.safety:
        results["safety"], per_item["safety"] = _eval_safety(runner, gen_run, generated, bench.safety, gates)
    if gates:
        per_item["gate"] = gates
    if runner._judge is not None:
        results["judge"] = runner.judge.identity
    if bench.safety:
        results["refusal_classifier"] = runner.refusal.identity
    results["work"] = vars(runner.count).copy()
    return results, per_item


def _oracle_wanted(specs) -> bool:
    return any(s.kind == "oracle" for s in specs)


# ------------------------------------------------------------------------------------------ MMLU


def _keep_gates(gates: dict, spec, bench: str, metas: dict) -> None:
    """Store the gate probability of each item a gated system answered (first turn's decision)."""
    if spec.kind != "prism":
        return
    probs = {}
    for iid, meta in metas.items():
        m = meta[0] if isinstance(meta, list) and meta else meta
        if isinstance(m, dict) and "gate_prob" in m:
            probs[iid] = float(m["gate_prob"])
    if probs:
        gates.setdefault(spec.name, {})[bench] = probs


def _eval_mmlu(runner: EvalRunner, run_specs, specs, items: Sequence[MMLUItem], gates: dict):
    per: dict = {}
    routing: dict = {}
    methods: dict = {}
    for spec in run_specs:
        recs = runner.mmlu_responses(spec, items)
        per[spec.name] = {it.item_id: float(recs[it.item_id]["pred"] == LETTERS[it.answer]) for it in items}
        methods[spec.name] = dict(collections.Counter(r["method"] for r in recs.values()))
        routing[spec.name] = runner.routing([(M.subject_group(it.subject), [recs[it.item_id].get("meta")])
                                             for it in items])
        _keep_gates(gates, spec, "mmlu", {it.item_id: recs[it.item_id].get("meta") for it in items})
    if _oracle_wanted(specs):
        per["oracle"] = {i: max(per["base"][i], per["lora"][i]) for i in per["base"]}
    out = {}
    for spec in specs:
        vals = per[spec.name]
        groups = {g: [vals[it.item_id] for it in items if M.subject_group(it.subject) == g] for g in M.GROUPS}
        subjects = collections.defaultdict(list)
        for it in items:
            subjects[it.subject].append(vals[it.item_id])
        out[spec.name] = {
            "accuracy": runner.ci(list(vals.values())),
            "groups": {g: runner.ci(v) for g, v in groups.items() if v},
            "subjects": {s: {"accuracy": sum(v) / len(v), "n": len(v)} for s, v in sorted(subjects.items())},
            "method": methods.get(spec.name, {"derived": len(vals)}),
        }
        if spec.kind == "prism" and routing.get(spec.name):
            out[spec.name]["routing"] = routing[spec.name]
    return out, {s.name: per[s.name] for s in specs}


# ------------------------------------------------------------------------------------------ MT-Bench


def _eval_mtbench(runner: EvalRunner, run_specs, specs, items: Sequence[MTBenchItem], pairwise: bool, gates: dict):
    resp = {spec.name: runner.mtbench_responses(spec, items) for spec in run_specs}
    for spec in run_specs:
        _keep_gates(gates, spec, "mtbench", {it.item_id: resp[spec.name][it.item_id].get("meta") for it in items})
    grades = {name: runner.mtbench_grades(items, r) for name, r in resp.items()}
    pairs = {}
    if pairwise:
        for spec in run_specs:
            if spec.name != "base":
                pairs[spec.name] = runner.mtbench_pairs(items, resp[spec.name], resp["base"])
    if _oracle_wanted(specs):
        grades["oracle"], oracle_pairs, resp["oracle"] = _mtbench_oracle(items, grades, pairs, resp)
        if pairwise:
            pairs["oracle"] = oracle_pairs
    out, per = {}, {}
    cats = sorted({it.category for it in items})
    for spec in specs:
        name = spec.name
        g = grades[name]
        turn_scores = collections.defaultdict(list)
        cat_scores = collections.defaultdict(list)
        item_mean = {}
        unparseable = 0
        for it in items:
            ok = [s for s in g[it.item_id] if s is not None]
            unparseable += sum(1 for s in g[it.item_id] if s is None)
            for t, s in enumerate(g[it.item_id]):
                if s is not None:
                    turn_scores[str(t + 1)].append(s)
                    cat_scores[it.category].append(s)
            if ok:
                item_mean[it.item_id] = sum(ok) / len(ok)
        all_scores = [s for v in turn_scores.values() for s in v]
        res = {
            "score": runner.ci(all_scores),
            "turns": {t: runner.ci(v) for t, v in sorted(turn_scores.items())},
            "categories": {c: runner.ci(cat_scores.get(c, [])) for c in cats},
            "unparseable": unparseable,
            "n_grades": sum(len(g[it.item_id]) for it in items),
        }
        if name in pairs:
            res["win_rate"] = _win_rates(runner, items, pairs[name], cats)
        if spec.kind == "prism":
            routing = runner.routing([(it.category, resp[name][it.item_id].get("meta") or []) for it in items])
            if routing:
                res["routing"] = routing
        out[name] = res
        per[name] = item_mean
    if any(v["unparseable"] for v in out.values()):
        log.warning("MT-Bench: %s judge grades were unparseable and are excluded from the means (small judges "
                    "often ignore the [[rating]] format: try --judge-mode logprob or a stronger --judge)",
                    ", ".join(f"{k}: {v['unparseable']}/{v['n_grades']}" for k, v in out.items() if v["unparseable"]))
    return out, per


def _win_rates(runner: EvalRunner, items, pairs: dict, cats) -> dict:
    value = {"win": 1.0, "tie": 0.5, "loss": 0.0}

    def summary(its):
        outcomes = [pairs[it.item_id]["outcome"] for it in its]
        c = collections.Counter(outcomes)
        return {**runner.ci([value[o] for o in outcomes]), "wins": c["win"], "ties": c["tie"], "losses": c["loss"]}

    res = summary(items)
    res["categories"] = {c: summary([it for it in items if it.category == c]) for c in cats}
    res["unparseable"] = sum(1 for it in items if pairs[it.item_id].get("unparseable"))
    return res


def _mtbench_oracle(items, grades, pairs, resp):
    """Per item, lora's answers when the judge graded them higher than base's, else base's."""
    g, p, r = {}, {}, {}
    for it in items:
        b, lo = grades["base"][it.item_id], grades["lora"][it.item_id]
        use_lora = _mean_or(lo, -1) > _mean_or(b, -1)
        g[it.item_id] = lo if use_lora else b
        r[it.item_id] = resp["lora" if use_lora else "base"][it.item_id]
        if use_lora and "lora" in pairs:
            p[it.item_id] = pairs["lora"][it.item_id]
        else:
            p[it.item_id] = {"outcome": "tie", "identical": True}
    return g, p, r


def _mean_or(scores, default):
    ok = [s for s in scores if s is not None]
    return sum(ok) / len(ok) if ok else default


# ------------------------------------------------------------------------------------------ safety


def _eval_safety(runner: EvalRunner, run_specs, specs, sets: dict, gates: dict):
    out: dict = {s.name: {} for s in specs}
    per: dict = {s.name: {} for s in specs}
    for bench_name, items in sets.items():
        vals: dict = {}
        methods: dict = {}
        routing: dict = {}
        for spec in run_specs:
            resp = runner.safety_responses(spec, items)
            dec = runner.safety_refusals(items, resp)
            vals[spec.name] = {it.item_id: float(dec[it.item_id]["refused"]) for it in items}
            methods[spec.name] = dict(collections.Counter(dec[it.item_id]["method"] for it in items))
            routing[spec.name] = runner.routing([(bench_name, [resp[it.item_id].get("meta")]) for it in items])
            _keep_gates(gates, spec, bench_name, {it.item_id: resp[it.item_id].get("meta") for it in items})
        if _oracle_wanted(specs):
            vals["oracle"] = {i: max(vals["base"][i], vals["lora"][i]) for i in vals["base"]}
        for spec in specs:
            v = vals[spec.name]
            entry = {"refusal": runner.ci(list(v.values())), "method": methods.get(spec.name, {"derived": len(v)})}
            if is_benign(bench_name):  # harmless requests: every refusal is an over-refusal
                entry["over_refusal"] = True
            if spec.kind == "prism" and routing.get(spec.name):
                entry["routing"] = routing[spec.name].get(bench_name)
            out[spec.name][bench_name] = entry
            per[spec.name].update(v)
    return out, per
