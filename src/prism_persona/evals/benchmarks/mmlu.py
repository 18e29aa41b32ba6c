"""MMLU, 0-shot: the log-likelihood of the answer letters, grouped into the four standard categories.

Everything MMLU-specific is here: loading it, the subject groups, the prompt, reading a letter, the
evaluator and its report section.

MMLU layouts
------------
* ``cais/mmlu`` (the hub default, or an export of it): ``.jsonl``, ``.json`` (a list of rows, or
  ``{"test": [...]}``), ``.csv`` with a header, or ``.parquet``, with columns ``question``, ``subject``,
  ``choices`` (a list of 4 strings; in CSV a JSON or Python list literal) and ``answer`` (0-3, or a
  letter). A folder of such files is read file by file.
* The original release: a folder of ``<subject>_test.csv`` files without a header, each row
  ``question, A, B, C, D, answer letter``.
"""

from __future__ import annotations

import ast
import collections
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ...errors import PrismError
from .. import sources as S
from ..base import Benchmark, CategoryPersona, Evaluator, keep_gates, oracle_wanted, register, scored
from ..data import take_stratified
from ..format import fig_md, fmt_ci, grouped_bars, md_table, present, routing_table
from ..runner import Job

LETTERS = ("A", "B", "C", "D")
MMLU_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class MMLUItem:
    item_id: str
    subject: str
    question: str
    choices: tuple
    answer: int  # index into LETTERS


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
# loading


def _answer_index(value, where: str) -> int:
    if isinstance(value, bool):
        raise PrismError(f"{where}: bad answer {value!r}; expected 0-3 or A-D")
    if isinstance(value, (int, float)) and int(value) == value and 0 <= int(value) <= 3:
        return int(value)
    s = str(value).strip()
    if s.upper() in LETTERS:
        return LETTERS.index(s.upper())
    if s.isdigit() and 0 <= int(s) <= 3:
        return int(s)
    raise PrismError(f"{where}: bad answer {value!r}; expected 0-3 or A-D")


def _choices(value, where: str) -> tuple:
    if isinstance(value, str):
        value = _parse_list_literal(value.strip())
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise PrismError(f"{where}: 'choices' must be a list of 4 options")
    return tuple(str(c) for c in value)


def _parse_list_literal(text: str):
    """A JSON list, a Python list literal, or numpy's ``"['a' 'b' 'c' 'd']"`` (pandas CSV of a list column)."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    candidates = [text]
    if re.search(r"['\"]\s+['\"]", text):  # numpy style: no commas between the quoted items
        candidates.insert(0, re.sub(r"(['\"])\s+(['\"])", r"\1, \2", text))
    for cand in candidates:
        try:
            return ast.literal_eval(cand)
        except (ValueError, SyntaxError):
            continue
    return None


def _mmlu_row(row, where: str, default_subject: str = "") -> MMLUItem:
    if not isinstance(row, dict):
        raise PrismError(f"{where}: expected an object with question, subject, choices, answer")
    if "choices" not in row and all(k in row for k in LETTERS):
        row = dict(row, choices=[row[k] for k in LETTERS])
    missing = [k for k in ("question", "choices", "answer") if k not in row]
    if missing:
        raise PrismError(
            f"{where}: missing column(s) {', '.join(missing)} "
            f"(the cais/mmlu layout has question, subject, choices, answer)"
        )
    question = str(row["question"] or "").strip()
    if not question:
        raise PrismError(f"{where}: empty question")
    subject = str(row.get("subject") or default_subject or "unknown").strip()
    return MMLUItem(
        f"{subject}/0", subject, question, _choices(row["choices"], where), _answer_index(row["answer"], where)
    )


def _read_original_csv(path: Path, subject: str) -> list[MMLUItem]:
    """One header-less ``<subject>_test.csv`` of the original release."""
    text = S.read_text(path, "MMLU")
    items = []
    for where, row in S.csv_rows(path, text):
        if not row or not any(c.strip() for c in row):
            continue
        if len(row) != 6:
            raise PrismError(f"{where}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
        letter = row[5].strip().upper()
        if letter not in LETTERS:
            raise PrismError(f"{where}: bad answer letter {row[5]!r}; expected A, B, C or D")
        items.append(
            MMLUItem(f"{subject}/0", subject, row[0].strip(), tuple(c.strip() for c in row[1:5]), LETTERS.index(letter))
        )
    return items


def _is_original_csv(path: Path) -> bool:
    """A ``<subject>_test.csv`` whose first row is not a ``question,...`` header."""
    if not (path.suffix.lower() == ".csv" and path.name.endswith("_test.csv")):
        return False
    with open(path, encoding="utf-8-sig", newline="") as fh:
        first = fh.read(64)
    return not first.lower().startswith("question")


def _mmlu_file(path: Path) -> list[MMLUItem]:
    if _is_original_csv(path):
        return _read_original_csv(path, path.name[: -len("_test.csv")])
    if path.suffix.lower() == ".csv":
        text = S.read_text(path, "MMLU")
        first = next(S.csv_rows(path, text), (None, []))[1]
        if "question" not in [c.strip() for c in first]:
            raise PrismError(
                f"{path}: a cais/mmlu CSV needs a header with question, subject, choices, answer "
                f"(got {first}); a header-less file must be named <subject>_test.csv"
            )
    if path.suffix.lower() not in MMLU_EXTENSIONS:
        raise PrismError(f"{path}: unsupported MMLU file type; use {', '.join(MMLU_EXTENSIONS)}")
    return [_mmlu_row(row, where) for where, row in S.read_records(path, "MMLU")]


def _mmlu_folder(p: Path) -> list[MMLUItem]:
    originals = sorted(p.glob("*_test.csv"))
    if originals:
        return [it for f in originals for it in _mmlu_file(f)]
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in MMLU_EXTENSIONS)
    files = [f for f in files if "test" in f.name] or files  # prefer the test split
    if not files:
        raise PrismError(
            f"{p}: no MMLU files found (expected <subject>_test.csv files, or "
            f"cais/mmlu exports: {', '.join(MMLU_EXTENSIONS)})"
        )
    return [it for f in files for it in _mmlu_file(f)]


def load_mmlu(
    path: str | Path | None = None, subjects: Optional[Iterable[str]] = None, limit: Optional[int] = None
) -> list[MMLUItem]:
    """MMLU test items: ``cais/mmlu`` from the hub (``path=None``), a cais/mmlu export (file or folder)
    or an original ``*_test.csv`` folder.

    ``subjects`` keeps only those subjects (an unknown name is an error); ``limit`` keeps at most that
    many items, spread round-robin over subjects.
    """
    if path is None:
        items = [_mmlu_row(row, where) for where, row in S.hub_rows("mmlu")]
        origin = MMLU.hub["mmlu"].repo
    else:
        p = S.need_path(path, "MMLU")
        items = _mmlu_folder(p) if p.is_dir() else _mmlu_file(p)
        origin = str(p)
    if not items:
        raise PrismError(f"{origin}: no MMLU questions in it")
    items = _renumber(items)
    if subjects:
        wanted = [s.strip() for s in subjects if s.strip()]
        have = {it.subject for it in items}
        unknown = sorted(set(wanted) - have)
        if unknown:
            raise PrismError(
                f"unknown MMLU subject(s) {', '.join(unknown)}; the data has: "
                f"{', '.join(sorted(have)[:12])}{' ...' if len(have) > 12 else ''}"
            )
        items = [it for it in items if it.subject in set(wanted)]
    return take_stratified(items, lambda it: it.subject, limit)


def _renumber(items: list[MMLUItem]) -> list[MMLUItem]:
    """Stable ids ``<subject>/<n>`` (n counts within the subject, in file order)."""
    counts: dict = {}
    out = []
    for it in items:
        n = counts.get(it.subject, 0)
        counts[it.subject] = n + 1
        out.append(MMLUItem(f"{it.subject}/{n}", it.subject, it.question, it.choices, it.answer))
    return out


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
            scores, routes = scored(engine, chats, LETTERS, gated=spec.kind == "prism")
            if scores is not None:
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

    def evaluate(self, runner, run_specs, specs, items):
        gates: dict = {}
        per: dict = {}
        routing: dict = {}
        to_persona: dict = {}
        methods: dict = {}
        for spec in run_specs:
            recs = self.responses(runner, spec, items)
            per[spec.name] = {it.item_id: float(recs[it.item_id]["pred"] == LETTERS[it.answer]) for it in items}
            methods[spec.name] = dict(collections.Counter(r["method"] for r in recs.values()))
            pairs = [(subject_group(it.subject), [recs[it.item_id].get("meta")]) for it in items]
            routing[spec.name] = runner.routing(pairs)
            to_persona[spec.name] = runner.persona_routing(pairs)
            keep_gates(gates, spec, "mmlu", {it.item_id: recs[it.item_id].get("meta") for it in items})
        if oracle_wanted(specs):
            per["oracle"] = {i: max(per["base"][i], per["lora"][i]) for i in per["base"]}
        out = {
            spec.name: self._summary(runner, spec, items, per[spec.name], methods, routing, to_persona)
            for spec in specs
        }
        return out, {s.name: per[s.name] for s in specs}, gates

    @staticmethod
    def _summary(runner, spec, items, vals: dict, methods: dict, routing: dict, to_persona: dict) -> dict:
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
            if to_persona.get(spec.name):  # a K-way artifact: the share routed to each persona
                res["routing_personas"] = to_persona[spec.name]
        return res


# --------------------------------------------------------------------------------------------------
# the benchmark


def _split(text: Optional[str]) -> Optional[list[str]]:
    return [s for s in (text or "").split(",") if s.strip()] or None


@register
class MMLU(Benchmark):
    name = "mmlu"
    accuracy_axis = True
    hub = {"mmlu": S.HubDataset("cais/mmlu", "all", "test", "--mmlu")}
    options = ("mmlu", "subjects", "mmlu_limit")
    personas = {  # the four subject groups (an item's category)
        "STEM": CategoryPersona(
            "science, technology, engineering and mathematics", ("stem", "science", "math", "mathematics", "physics")
        ),
        "Humanities": CategoryPersona("history, philosophy and law", ("humanities", "history", "philosophy", "law")),
        "Social Sciences": CategoryPersona(
            "the social sciences", ("social science", "social sciences", "economics", "psychology", "humanities")
        ),
        "Other": CategoryPersona(
            "medicine, business and general knowledge", ("medicine", "health", "business", "general knowledge")
        ),
    }

    def load(self, cfg, names, limit):
        if "mmlu" not in names:
            return []
        return load_mmlu(self.data_path(cfg, "mmlu"), subjects=_split(cfg.subjects), limit=cfg.mmlu_limit or limit)

    def evaluator(self, pairwise: bool) -> Evaluator:
        return MMLUEvaluator()

    def categories(self, items):
        return {"mmlu": {it.item_id: subject_group(it.subject) for it in items}}

    def label(self, member: str) -> str:
        return "MMLU accuracy"

    @staticmethod
    def _groups(section: dict, systems) -> list[str]:
        return [g for g in GROUPS if any(g in section[s]["groups"] for s in systems)]

    def markdown(self, results, figures):
        mm = results["mmlu"]
        systems = present(mm, results["systems"])
        groups = self._groups(mm, systems)
        rows = [
            [s, fmt_ci(mm[s]["accuracy"], pct=True)] + [fmt_ci(mm[s]["groups"].get(g), pct=True) for g in groups]
            for s in systems
        ]
        parts = ["## MMLU (0-shot, answer-letter log-likelihood)", ""]
        parts += [md_table(["system", "accuracy"] + groups, rows), ""]
        return parts + routing_table(mm, systems, "MMLU") + fig_md(figures, "mmlu")

    def figures(self, results, out):
        mm = results["mmlu"]
        systems = present(mm, results["systems"])
        groups = ["all"] + self._groups(mm, systems)
        series = {s: [mm[s]["accuracy"]] + [mm[s]["groups"].get(g) for g in groups[1:]] for s in systems}
        path = grouped_bars(
            out / "mmlu.png",
            "MMLU accuracy (95% CI)",
            groups,
            series,
            "accuracy (%)",
            scale=100,
            ylim=(0, 100),
            hline=25,
        )
        return {"mmlu": path}

    def routing_rows(self, section):
        return [(f"MMLU {c}", v) for c, v in (section.get("routing") or {}).items() if c != "all"]
