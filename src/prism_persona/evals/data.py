"""Benchmark loaders: MMLU, MT-Bench questions, the safety sets and the benign (over-refusal) sets.

By default every loader reads the benchmark's Hugging Face hub dataset (:data:`.sources.HUB`); a path
(file or folder) replaces it. Every loader returns plain dataclass items and raises
:class:`~prism_persona.errors.PrismError` naming the file and line (or item) for a missing, empty or
malformed input. Files are read with the proper parsers (:mod:`.sources`).

MMLU layouts
------------
* ``cais/mmlu`` (the hub default, or an export of it): ``.jsonl``, ``.json`` (a list of rows, or
  ``{"test": [...]}``), ``.csv`` with a header, or ``.parquet``, with columns ``question``, ``subject``,
  ``choices`` (a list of 4 strings; in CSV a JSON or Python list literal) and ``answer`` (0-3, or a
  letter). A folder of such files is read file by file.
* The original release: a folder of ``<subject>_test.csv`` files without a header, each row
  ``question, A, B, C, D, answer letter``.

Safety and benign sets
----------------------
A record's prompt is its ``Goal`` (JailbreakBench), ``Behavior`` (+ ``ContextString``, HarmBench's
CSV) or ``prompt`` / ``text`` / ``goal`` / ``query`` / ``question`` field, or the record itself in a
JSON list of strings. Duplicate prompts (PKU-SafeRLHF lists each prompt with several responses) are
kept once.
"""

from __future__ import annotations

import ast
import json
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import PrismError
from . import sources as S

log = logging.getLogger(__name__)

LETTERS = ("A", "B", "C", "D")
HARMFUL_SETS = ("harmbench", "jailbreak", "pku")
BENIGN_SETS = ("benign",)
"""Sets of harmless requests: their refusal rate is reported as over-refusal."""
SAFETY_BENCHMARKS = HARMFUL_SETS + BENIGN_SETS
MMLU_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
PROMPT_FIELDS = ("prompt", "Goal", "goal", "text", "query", "question", "Behavior", "behavior")
CATEGORY_FIELDS = ("category", "Category", "SemanticCategory", "FunctionalCategory")
ID_FIELDS = ("BehaviorID", "Index", "id", "prompt_id")


@dataclass(frozen=True)
class MMLUItem:
    item_id: str
    subject: str
    question: str
    choices: tuple
    answer: int  # index into LETTERS


@dataclass(frozen=True)
class MTBenchItem:
    item_id: str
    category: str
    turns: tuple
    reference: tuple = ()


@dataclass(frozen=True)
class SafetyItem:
    item_id: str
    benchmark: str
    prompt: str
    category: str = ""


def is_benign(benchmark: str) -> bool:
    return benchmark in BENIGN_SETS


def take_stratified(items: Sequence, key: Callable, limit: Optional[int]) -> list:
    """At most ``limit`` items, taken round-robin over the groups of ``key`` (so every group shows up).

    Order inside a group is kept; ``None`` or a limit >= len(items) returns everything.
    """
    items = list(items)
    if limit is None or limit >= len(items):
        return items
    if limit <= 0:
        return []
    groups: dict = {}
    for it in items:
        groups.setdefault(key(it), []).append(it)
    out: list = []
    depth = 0
    while len(out) < limit:
        for g in groups.values():
            if depth < len(g) and len(out) < limit:
                out.append(g[depth])
        depth += 1
    chosen = set(map(id, out))
    return [it for it in items if id(it) in chosen]


# --------------------------------------------------------------------------------------------------
# MMLU


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
        origin = S.HUB["mmlu"].repo
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
# MT-Bench


def _mtbench_row(row, where: str) -> MTBenchItem:
    """FastChat's ``question.jsonl`` layout; HuggingFaceH4/mt_bench_prompts' ``prompt``/``prompt_id`` too."""
    if not isinstance(row, dict):
        raise PrismError(f"{where}: expected an object with question_id, category, turns")
    row = dict(row)
    if "turns" not in row and "prompt" in row:
        row["turns"] = row["prompt"]
    if "question_id" not in row and "prompt_id" in row:
        row["question_id"] = row["prompt_id"]
    missing = [k for k in ("question_id", "category", "turns") if k not in row]
    if missing:
        raise PrismError(f"{where}: missing field(s) {', '.join(missing)}")
    turns = row["turns"]
    if hasattr(turns, "tolist"):
        turns = turns.tolist()
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise PrismError(f"{where}: 'turns' must be a non-empty list of strings")
    ref = row.get("reference") or []
    ref = ref.tolist() if hasattr(ref, "tolist") else ref
    return MTBenchItem(
        str(row["question_id"]),
        str(row["category"]),
        tuple(turns),
        tuple(str(r) for r in ref) if isinstance(ref, list) else (),
    )


def load_mtbench(
    path: str | Path | None = None, categories: Optional[Iterable[str]] = None, limit: Optional[int] = None
) -> list[MTBenchItem]:
    """MT-Bench questions (``question_id``, ``category``, ``turns`` [, ``reference``]): the hub copy of
    FastChat's ``question.jsonl`` by default, or a local .jsonl/.json/.parquet file."""
    rows = S.rows_from("mtbench", path, "MT-Bench")
    items = [_mtbench_row(row, where) for where, row in rows]
    if not items:
        raise PrismError(f"MT-Bench file has no questions: {path}")
    if categories:
        wanted = {c.strip() for c in categories if c.strip()}
        items = [it for it in items if it.category in wanted]
    return take_stratified(items, lambda it: it.category, limit)


# --------------------------------------------------------------------------------------------------
# safety and benign prompt sets


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
