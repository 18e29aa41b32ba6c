"""MMLU, 0-shot: the log-likelihood of the answer letters, grouped into the four standard categories.

Everything MMLU-specific is here: the subject groups, the prompt, reading a letter, and the evaluator.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence
from typing import Optional

from .base import Evaluator, keep_gates, oracle_wanted, route_meta
from .data import LETTERS, MMLUItem
from .runner import Job

GROUPS = ("STEM", "Humanities", "Social Sciences", "Other")
TEXT_TOKENS = 8
"""Tokens generated for the answer letter by an engine that cannot score choices."""

_SUBCATEGORY = {
    "abstract_algebra": "math",
    "anatomy": "health",
    "astronomy": "physics",
    "business_ethics": "business",
    "clinical_knowledge": "health",
    "college_biology": "biology",
    "college_chemistry": "chemistry",
    "college_computer_science": "computer science",
    "college_mathematics": "math",
    "college_medicine": "health",
    "college_physics": "physics",
    "computer_security": "computer science",
    "conceptual_physics": "physics",
    "econometrics": "economics",
    "electrical_engineering": "engineering",
    "elementary_mathematics": "math",
    "formal_logic": "philosophy",
    "global_facts": "other",
    "high_school_biology": "biology",
    "high_school_chemistry": "chemistry",
    "high_school_computer_science": "computer science",
    "high_school_european_history": "history",
    "high_school_geography": "geography",
    "high_school_government_and_politics": "politics",
    "high_school_macroeconomics": "economics",
    "high_school_mathematics": "math",
    "high_school_microeconomics": "economics",
    "high_school_physics": "physics",
    "high_school_psychology": "psychology",
    "high_school_statistics": "math",
    "high_school_us_history": "history",
    "high_school_world_history": "history",
    "human_aging": "health",
    "human_sexuality": "culture",
    "international_law": "law",
    "jurisprudence": "law",
    "logical_fallacies": "philosophy",
    "machine_learning": "computer science",
    "management": "business",
    "marketing": "business",
    "medical_genetics": "health",
    "miscellaneous": "other",
    "moral_disputes": "philosophy",
    "moral_scenarios": "philosophy",
    "nutrition": "health",
    "philosophy": "philosophy",
    "prehistory": "history",
    "professional_accounting": "other",
    "professional_law": "law",
    "professional_medicine": "health",
    "professional_psychology": "psychology",
    "public_relations": "politics",
    "security_studies": "politics",
    "sociology": "culture",
    "us_foreign_policy": "politics",
    "virology": "health",
    "world_religions": "philosophy",
}

_GROUP_OF_SUB = {
    "physics": "STEM",
    "chemistry": "STEM",
    "biology": "STEM",
    "computer science": "STEM",
    "math": "STEM",
    "engineering": "STEM",
    "history": "Humanities",
    "philosophy": "Humanities",
    "law": "Humanities",
    "politics": "Social Sciences",
    "culture": "Social Sciences",
    "economics": "Social Sciences",
    "geography": "Social Sciences",
    "psychology": "Social Sciences",
    "other": "Other",
    "business": "Other",
    "health": "Other",
}

SUBJECT_GROUP = {s: _GROUP_OF_SUB[sub] for s, sub in _SUBCATEGORY.items()}
"""The 57 MMLU subjects -> STEM / Humanities / Social Sciences / Other (the MMLU paper's grouping)."""


def subject_group(subject: str) -> str:
    """Group of a subject; unknown subjects count as Other."""
    return SUBJECT_GROUP.get(subject.strip().lower().replace(" ", "_"), "Other")


def pretty_subject(subject: str) -> str:
    return subject.replace("_", " ")


def mmlu_prompt(item: MMLUItem) -> str:
    """The 0-shot prompt: question, lettered options, and a request for the letter only."""
    opts = "\n".join(f"{L}. {c}" for L, c in zip(LETTERS, item.choices))
    return (
        f"The following is a multiple choice question about {pretty_subject(item.subject)}.\n\n"
        f"{item.question}\n{opts}\n\nAnswer with the letter of the correct option (A, B, C or D) only."
    )


def argmax_letter(scores: dict) -> str:
    """The best-scored letter; ties go to the earliest letter."""
    return max(LETTERS, key=lambda L: (scores.get(L, float("-inf")), -LETTERS.index(L)))


def parse_letter(text: str) -> Optional[str]:
    """The answer letter in generated text ("B", "(B)", "Answer: B", "B. ..."), else None."""
    t = (text or "").strip()
    m = re.search(r"(?:answer|option)\s*(?:is)?\s*[:\-]?\s*\(?([ABCD])\b", t, re.I)
    if m:
        return m.group(1).upper()
    m = re.match(r"\(?([ABCD])\b", t)
    return m.group(1) if m else None


def item_records_correct(items: Sequence[MMLUItem], preds: dict) -> dict:
    """item_id -> 1.0/0.0 correctness for predicted letters (missing/None counts as wrong)."""
    return {it.item_id: float(preds.get(it.item_id) == LETTERS[it.answer]) for it in items}


# --------------------------------------------------------------------------------------------------
# the evaluator


class MMLUEvaluator(Evaluator):
    """0-shot MMLU: the answer letter's log-likelihood (or, for engines that cannot score, the letter in a
    few generated tokens); accuracy overall, per group and per subject; routing per group."""

    name = "mmlu"

    def responses(self, runner, spec, items: Sequence[MMLUItem]) -> dict[str, dict]:
        """item_id -> record with ``pred`` (letter or None), ``scores`` / ``text`` and routing ``meta``."""
        jobs = []
        for it in items:
            chat, persona, domain = runner.chat_for(
                spec, subject_group(it.subject), it.item_id, [{"role": "user", "content": mmlu_prompt(it)}]
            )
            jobs.append(Job(it.item_id, runner.key(spec, "mmlu", it.item_id, persona, {"prompt": 1}), chat, domain))

        def run_chunk(engine, chunk):
            chats = [j.payload for j in chunk]
            scores = engine.score_choices(chats, list(LETTERS))
            if scores is not None:
                routes = route_meta(engine, chats) if spec.kind == "prism" else [{} for _ in chats]
                runner.count.scored += len(chunk)
                return [
                    {"method": "logprob", "scores": {L: sc[L] for L in LETTERS}, "pred": argmax_letter(sc), "meta": rt}
                    for sc, rt in zip(scores, routes)
                ]
            outs = engine.generate(chats, runner.gen(TEXT_TOKENS))
            runner.count.generated += len(chunk)
            return [
                {"method": "text", "text": o.text, "pred": parse_letter(o.text), "meta": runner.meta(o)} for o in outs
            ]

        return runner.responses_for(spec, "mmlu", jobs, run_chunk)

    def evaluate(self, runner, run_specs, specs, items, gates):
        per: dict = {}
        routing: dict = {}
        methods: dict = {}
        for spec in run_specs:
            recs = self.responses(runner, spec, items)
            per[spec.name] = {it.item_id: float(recs[it.item_id]["pred"] == LETTERS[it.answer]) for it in items}
            methods[spec.name] = dict(collections.Counter(r["method"] for r in recs.values()))
            routing[spec.name] = runner.routing(
                [(subject_group(it.subject), [recs[it.item_id].get("meta")]) for it in items]
            )
            keep_gates(gates, spec, "mmlu", {it.item_id: recs[it.item_id].get("meta") for it in items})
        if oracle_wanted(specs):
            per["oracle"] = {i: max(per["base"][i], per["lora"][i]) for i in per["base"]}
        out = {spec.name: self._summary(runner, spec, items, per[spec.name], methods, routing) for spec in specs}
        return out, {s.name: per[s.name] for s in specs}

    @staticmethod
    def _summary(runner, spec, items, vals: dict, methods: dict, routing: dict) -> dict:
        groups = {g: [vals[it.item_id] for it in items if subject_group(it.subject) == g] for g in GROUPS}
        subjects = collections.defaultdict(list)
        for it in items:
            subjects[it.subject].append(vals[it.item_id])
        res = {
            "accuracy": runner.ci(list(vals.values())),
            "groups": {g: runner.ci(v) for g, v in groups.items() if v},
            "subjects": {s: {"accuracy": sum(v) / len(v), "n": len(v)} for s, v in sorted(subjects.items())},
            "method": methods.get(spec.name, {"derived": len(vals)}),
        }
        if spec.kind == "prism" and routing.get(spec.name):
            res["routing"] = routing[spec.name]
        return res
