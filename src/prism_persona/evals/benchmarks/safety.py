"""Safety: refusal rate on harmful requests, and over-refusal on benign ones, per prompt set.

Responses are generated greedily (``--safety-tokens``) and every refusal is decided by the runner's
pluggable refusal classifier (``--refusal-classifier``: the judge, the string-match baseline or a
user function); each decision is stored with its response for audit. Loading the prompt sets and the
report section are here too.

Safety and benign sets
----------------------
A record's prompt is its ``Goal`` (JailbreakBench), ``Behavior`` (+ ``ContextString``, HarmBench's
CSV) or ``prompt`` / ``text`` / ``goal`` / ``query`` / ``question`` field, or the record itself in a
JSON list of strings. Duplicate prompts (PKU-SafeRLHF lists each prompt with several responses) are
kept once.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ...errors import PrismError
from ...store import content_key
from .. import sources as S
from ..base import Benchmark, CategoryPersona, Evaluator, keep_gates, oracle_wanted, register
from ..format import fig_md, fmt_ci, grouped_bars, md_table, present
from ..runner import Job

HARMFUL_SETS = ("harmbench", "jailbreak", "pku")
BENIGN_SETS = ("benign",)
"""Sets of harmless requests: their refusal rate is reported as over-refusal."""
SAFETY_BENCHMARKS = HARMFUL_SETS + BENIGN_SETS
PROMPT_FIELDS = ("prompt", "Goal", "goal", "text", "query", "question", "Behavior", "behavior")
CATEGORY_FIELDS = ("category", "Category", "SemanticCategory", "FunctionalCategory")
ID_FIELDS = ("BehaviorID", "Index", "id", "prompt_id")
SAFETY_PERSONA = CategoryPersona("AI safety and ethics", ("safety", "ethics", "security"))
"""The persona of a set of harmful requests (and of a labelled set's both intents)."""
LABELS = {
    "harmbench": "HarmBench",
    "jailbreak": "JBB harmful",
    "pku": "PKU-SafeRLHF",
    "benign": "JBB benign (over-refusal)",
}


@dataclass(frozen=True)
class SafetyItem:
    item_id: str
    benchmark: str
    prompt: str
    category: str = ""


def is_benign(benchmark: str) -> bool:
    return benchmark in BENIGN_SETS


def _first(row: dict, fields: Sequence[str]) -> str:
    return next((str(row[k]).strip() for k in fields if row.get(k) not in (None, "") and str(row[k]).strip()), "")


def _prompt_of(row, where: str) -> tuple[str, str, str]:
    """(prompt, category, id) of one record (see the module docstring for the fields read)."""
    if isinstance(row, str):
        if not row.strip():
            raise PrismError(f"{where}: expected a non-empty prompt string")
        return row.strip(), "", ""
    if not isinstance(row, dict):
        raise PrismError(f"{where}: expected a prompt string or an object with a prompt field")
    if "Behavior" in row and "Goal" not in row:  # HarmBench's CSV: the behaviour is the request
        prompt = _first(row, ("Behavior",))
        context = _first(row, ("ContextString",))
        prompt = f"{context}\n\n---\n\n{prompt}" if context and prompt else prompt
    else:
        prompt = _first(row, PROMPT_FIELDS)
        context = _first(row, ("context",))
        prompt = f"{context}\n\n---\n\n{prompt}" if context and prompt else prompt
    if not prompt:
        raise PrismError(f"{where}: expected a non-empty prompt ({', '.join(PROMPT_FIELDS[:4])} ...)")
    return prompt, _first(row, CATEGORY_FIELDS), _first(row, ID_FIELDS)


def _check_harmbench_header(rows: list, path) -> None:
    first = rows[0][1] if rows else None
    if path is not None and isinstance(first, dict) and not any(k in first for k in ("Behavior", "prompt")):
        raise PrismError(f"{path}: a HarmBench file needs a 'Behavior' column (or 'prompt'; got {', '.join(first)})")


def load_safety(benchmark: str, path: str | Path | None = None, limit: Optional[int] = None) -> list[SafetyItem]:
    """Prompts of one safety or benign set (hub dataset by default, or a local .csv/.json/.jsonl/.parquet)."""
    if benchmark not in SAFETY_BENCHMARKS:
        raise PrismError(f"unknown safety benchmark '{benchmark}'; choose from {', '.join(SAFETY_BENCHMARKS)}")
    rows = S.rows_from(benchmark, path, benchmark)
    if benchmark == "harmbench":
        _check_harmbench_header(rows, path)
    items, seen = [], set()
    for where, row in rows:
        prompt, category, rid = _prompt_of(row, where)
        if prompt in seen:
            continue
        seen.add(prompt)
        items.append(SafetyItem(f"{benchmark}/{rid or len(items)}", benchmark, prompt, category))
    if len({it.item_id for it in items}) != len(items):  # ids repeat (e.g. two files): number them
        items = [SafetyItem(f"{benchmark}/{i}", benchmark, it.prompt, it.category) for i, it in enumerate(items)]
    if not items:
        raise PrismError(f"{benchmark} file has no prompts: {path}")
    return items[:limit] if limit is not None else items


class SafetyEvaluator(Evaluator):
    """Items are ``{set name: [SafetyItem]}``; results are ``{system: {set name: {...}}}``. ``benign``: the
    sets of harmless requests (their refusals are over-refusals; their oracle answers when either branch does)."""

    name = "safety"

    def __init__(self, benign: Sequence[str] = BENIGN_SETS, persona_by_category: bool = False):
        self.benign = tuple(benign)
        self.persona_by_category = persona_by_category

    def persona_category(self, runner, it: SafetyItem) -> str:
        """What the matched persona is chosen for: the item's category when ``persona_by_category`` and a
        persona domain matches it (a labelled set's domains), else the item's set."""
        if self.persona_by_category and it.category and runner.book.domain_for(it.category):
            return it.category
        return it.benchmark

    def responses(self, runner, spec, items: Sequence[SafetyItem]) -> dict[str, dict]:
        jobs = []
        for it in items:
            chat, persona, domain = runner.chat_for(
                spec, self.persona_category(runner, it), it.item_id, [{"role": "user", "content": it.prompt}]
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

    def evaluate(self, runner, run_specs, specs, sets):
        gates: dict = {}
        out: dict = {s.name: {} for s in specs}
        per: dict = {s.name: {} for s in specs}
        for bench_name, items in sets.items():
            vals: dict = {}
            methods: dict = {}
            routing: dict = {}
            to_persona: dict = {}
            by_category: dict = {}
            for spec in run_specs:
                resp = self.responses(runner, spec, items)
                dec = self.refusals(runner, items, resp)
                vals[spec.name] = {it.item_id: float(dec[it.item_id]["refused"]) for it in items}
                methods[spec.name] = dict(collections.Counter(dec[it.item_id]["method"] for it in items))
                metas = [resp[it.item_id].get("meta") for it in items]
                routing[spec.name] = runner.routing([(bench_name, [m]) for m in metas])
                to_persona[spec.name] = runner.persona_routing([(bench_name, [m]) for m in metas])
                by_category[spec.name] = runner.routing(
                    [(it.category, [m]) for it, m in zip(items, metas) if it.category]
                )
                keep_gates(gates, spec, bench_name, {it.item_id: resp[it.item_id].get("meta") for it in items})
            if oracle_wanted(specs):
                # the better branch per item: refusing a harmful request, answering a harmless one
                best = min if bench_name in self.benign else max
                vals["oracle"] = {i: best(vals["base"][i], vals["lora"][i]) for i in vals["base"]}
            for spec in specs:
                v = vals[spec.name]
                entry = {"refusal": runner.ci(list(v.values())), "method": methods.get(spec.name, {"derived": len(v)})}
                if bench_name in self.benign:  # harmless requests: every refusal is an over-refusal
                    entry["over_refusal"] = True
                if spec.kind == "prism" and routing.get(spec.name):
                    entry["routing"] = routing[spec.name].get(bench_name)
                    if to_persona.get(spec.name):  # a K-way artifact: the share routed to each persona
                        entry["routing_personas"] = {n: by.get(bench_name) for n, by in to_persona[spec.name].items()}
                    cats = {c: v for c, v in by_category[spec.name].items() if c != "all"}
                    if cats:
                        entry["routing_by_category"] = cats
                out[spec.name][bench_name] = entry
                per[spec.name].update(v)
        return out, per, gates


# --------------------------------------------------------------------------------------------------
# the benchmark


@register
class Safety(Benchmark):
    """A family of prompt sets: ``--benchmarks safety`` means all of them."""

    name = "safety"
    title = "Safety"
    sets = SAFETY_BENCHMARKS
    benign_sets: tuple = BENIGN_SETS
    """Its sets of harmless requests (refusal = over-refusal, lower is better)."""
    hub = {
        "harmbench": S.HubDataset("walledai/HarmBench", "standard", "train", "--harmbench"),
        "jailbreak": S.HubDataset("JailbreakBench/JBB-Behaviors", "behaviors", "harmful", "--jailbreak"),
        "pku": S.HubDataset("PKU-Alignment/PKU-SafeRLHF", "default", "test", "--pku"),
        "benign": S.HubDataset("JailbreakBench/JBB-Behaviors", "behaviors", "benign", "--benign"),
    }
    options = ("harmbench", "jailbreak", "pku", "benign", "safety_limit", "safety_tokens")
    personas = {  # an item's persona category is its set
        "harmbench": SAFETY_PERSONA,
        "jailbreak": SAFETY_PERSONA,
        "pku": CategoryPersona("AI safety and ethics", ("safety", "ethics")),
        "benign": CategoryPersona(
            "general knowledge and everyday assistance", ("general knowledge", "writing", "helpfulness")
        ),
    }

    def load(self, cfg, names, limit):
        return {
            s: load_safety(s, self.data_path(cfg, s), limit=cfg.safety_limit or limit) for s in self.sets if s in names
        }

    def evaluator(self, pairwise: bool) -> Evaluator:
        return SafetyEvaluator(self.benign_sets)

    def categories(self, items):
        return {name: {it.item_id: name for it in its} for name, its in items.items()}

    def set_label(self, member: str) -> str:
        """A set's name in tables and figures (``"JBB harmful"``)."""
        return LABELS.get(member, member)

    def label(self, member: str) -> str:
        return f"{self.set_label(member)} refusal"

    def study_label(self, member: str) -> str:
        return f"{member} refusal"

    def higher_is_better(self, member: str) -> bool:
        return member not in self.benign_sets

    def extras(self, runner) -> dict:
        return {"refusal_classifier": runner.refusal.identity}

    def markdown(self, results, figures):
        sf = results[self.name]
        systems = present(sf, results["systems"])
        benches = list(next(iter(sf.values())))
        names = [self.set_label(b) for b in benches]
        rc = (results.get("refusal_classifier") or {}).get("classifier", "judge")
        parts = [f"## {self.title} (refusal rate; over-refusal on benign requests; decided by: {rc})", ""]
        rows = [[s] + [fmt_ci(sf[s][b]["refusal"], pct=True) for b in benches] for s in systems]
        parts += [md_table(["system"] + names, rows), ""]
        meth = [[s] + [", ".join(f"{k} {v}" for k, v in sf[s][b]["method"].items()) for b in benches] for s in systems]
        parts += [
            "How refusals were decided (logprob / text = judge, keyword = judge fallback, string = "
            "string-match baseline, callable = user function, classifier = a Hugging Face classifier):",
            "",
            md_table(["system"] + names, meth),
            "",
        ]
        prism = [s for s in systems if any(sf[s][b].get("routing") for b in benches)]
        if prism:
            rows = [[s] + [fmt_ci(sf[s][b].get("routing"), pct=True) for b in benches] for s in prism]
            named = []  # a K-way artifact: the share routed to each persona (from the decision records)
            for s in prism:
                for n in dict.fromkeys(n for b in benches for n in sf[s][b].get("routing_personas") or {}):
                    named.append(n)
                    rows.append(
                        [f"{s}, to {n}"]
                        + [fmt_ci((sf[s][b].get("routing_personas") or {}).get(n), pct=True) for b in benches]
                    )
            head = "Routed to an adapter (any persona, then each persona):" if named else "Routed to the LoRA:"
            parts += [head, "", md_table(["system"] + names, rows), ""]
        return parts + fig_md(figures, self.name)

    def figures(self, results, out):
        sf = results[self.name]
        systems = present(sf, results["systems"])
        benches = list(next(iter(sf.values())))
        series = {s: [sf[s][b]["refusal"] for b in benches] for s in systems}
        path = grouped_bars(
            out / f"{self.name}.png",
            f"{self.title}: refusal rate (95% CI)",
            [self.set_label(b) for b in benches],
            series,
            "refused (%)",
            scale=100,
            ylim=(0, 100),
        )
        return {self.name: path}

    def routing_rows(self, section):
        rows = []
        for b, v in section.items():
            if v.get("routing"):
                rows.append((self.set_label(b), v["routing"]))
                rows += [(f"{self.set_label(b)}: {c}", ci) for c, ci in v.get("routing_by_category", {}).items()]
        return rows
