"""MMLU, 0-shot: the log-likelihood of the answer letters, grouped into the four standard categories."""

from __future__ import annotations

import re
from typing import Optional, Sequence

from .data import LETTERS, MMLUItem

GROUPS = ("STEM", "Humanities", "Social Sciences", "Other")

_SUBCATEGORY = {
    "abstract_algebra": "math", "anatomy": "health", "astronomy": "physics", "business_ethics": "business",
    "clinical_knowledge": "health", "college_biology": "biology", "college_chemistry": "chemistry",
    "college_computer_science": "computer science", "college_mathematics": "math", "college_medicine": "health",
    "college_physics": "physics", "computer_security": "computer science", "conceptual_physics": "physics",
    "econometrics": "economics", "electrical_engineering": "engineering", "elementary_mathematics": "math",
    "formal_logic": "philosophy", "global_facts": "other", "high_school_biology": "biology",
    "high_school_chemistry": "chemistry", "high_school_computer_science": "computer science",
    "high_school_european_history": "history", "high_school_geography": "geography",
    "high_school_government_and_politics": "politics", "high_school_macroeconomics": "economics",
    "high_school_mathematics": "math", "high_school_microeconomics": "economics", "high_school_physics": "physics",
    "high_school_psychology": "psychology", "high_school_statistics": "math", "high_school_us_history": "history",
    "high_school_world_history": "history", "human_aging": "health", "human_sexuality": "culture",
    "international_law": "law", "jurisprudence": "law", "logical_fallacies": "philosophy",
    "machine_learning": "computer science", "management": "business", "marketing": "business",
    "medical_genetics": "health", "miscellaneous": "other", "moral_disputes": "philosophy",
    "moral_scenarios": "philosophy", "nutrition": "health", "philosophy": "philosophy", "prehistory": "history",
    "professional_accounting": "other", "professional_law": "law", "professional_medicine": "health",
    "professional_psychology": "psychology", "public_relations": "politics", "security_studies": "politics",
    "sociology": "culture", "us_foreign_policy": "politics", "virology": "health", "world_religions": "philosophy",
}

_GROUP_OF_SUB = {
    "physics": "STEM", "chemistry": "STEM", "biology": "STEM", "computer science": "STEM", "math": "STEM",
    "engineering": "STEM", "history": "Humanities", "philosophy": "Humanities", "law": "Humanities",
    "politics": "Social Sciences", "culture": "Social Sciences", "economics": "Social Sciences",
    "geography": "Social Sciences", "psychology": "Social Sciences", "other": "Other", "business": "Other",
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
    return (f"The following is a multiple choice question about {pretty_subject(item.subject)}.\n\n"
            f"{item.question}\n{opts}\n\nAnswer with the letter of the correct option (A, B, C or D) only.")


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
