"""Safety: refusal rate on harmful requests, and over-refusal on benign ones, per prompt set.

Responses are generated greedily (``--safety-tokens``) and every refusal is decided by the runner's
pluggable refusal classifier (``--refusal-classifier``: the judge, the string-match baseline or a
user function); each decision is stored with its response for audit.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

from ..store import content_key
from .base import Evaluator, keep_gates, oracle_wanted
from .data import SafetyItem, is_benign
from .runner import Job


class SafetyEvaluator(Evaluator):
    """Items are ``{set name: [SafetyItem]}``; results are ``{system: {set name: {...}}}``."""

    name = "safety"

    def responses(self, runner, spec, items: Sequence[SafetyItem]) -> dict[str, dict]:
        jobs = []
        for it in items:
            chat, persona, domain = runner.chat_for(
                spec, it.benchmark, it.item_id, [{"role": "user", "content": it.prompt}]
            )
            jobs.append(
                Job(
                    it.item_id,
                    runner.key(spec, "safety", it.item_id, persona, {"tokens": runner.s.safety_tokens}),
                    chat,
                    domain,
                )
            )
        params = runner.gen(runner.s.safety_tokens)
        bench = items[0].benchmark if items else "safety"

        def run_chunk(engine, chunk):
            outs = engine.generate([j.payload for j in chunk], params)
            runner.count.generated += len(chunk)
            return [{"response": o.text, "meta": runner.meta(o)} for o in outs]

        return runner.responses_for(spec, bench, jobs, run_chunk)

    @staticmethod
    def refusals(runner, items: Sequence[SafetyItem], resp: dict) -> dict[str, dict]:
        """item_id -> the refusal classifier's decision (stored in judgments.jsonl with the response)."""
        rid = runner.refusal.identity
        jobs, keys = [], {}
        for it in items:
            r = resp[it.item_id]["response"]
            k = content_key("refusal", rid, it.prompt, r)
            keys[it.item_id] = k
            jobs.append(
                (k, (it.prompt, r), {"judge": rid, "item_id": it.item_id, "request": it.prompt[:500], "response": r})
            )

        def judge_chunk(pairs):
            return runner.refusal.classify([q for q, _ in pairs], [r for _, r in pairs])

        done = runner.judged("refusal", jobs, judge_chunk)
        return {iid: done[k] for iid, k in keys.items()}

    def evaluate(self, runner, run_specs, specs, sets, gates):
        out: dict = {s.name: {} for s in specs}
        per: dict = {s.name: {} for s in specs}
        for bench_name, items in sets.items():
            vals: dict = {}
            methods: dict = {}
            routing: dict = {}
            for spec in run_specs:
                resp = self.responses(runner, spec, items)
                dec = self.refusals(runner, items, resp)
                vals[spec.name] = {it.item_id: float(dec[it.item_id]["refused"]) for it in items}
                methods[spec.name] = dict(collections.Counter(dec[it.item_id]["method"] for it in items))
                routing[spec.name] = runner.routing([(bench_name, [resp[it.item_id].get("meta")]) for it in items])
                keep_gates(gates, spec, bench_name, {it.item_id: resp[it.item_id].get("meta") for it in items})
            if oracle_wanted(specs):
                # the better branch per item: refusing a harmful request, answering a harmless one
                best = min if is_benign(bench_name) else max
                vals["oracle"] = {i: best(vals["base"][i], vals["lora"][i]) for i in vals["base"]}
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
