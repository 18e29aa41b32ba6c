"""Benchmark loaders: MMLU (two layouts), MT-Bench questions and the safety prompt sets.

Every loader returns plain dataclass items and raises :class:`~prism_persona.errors.PrismError`
naming the file (and the line, where there is one) for a missing, empty or malformed file.

MMLU layouts
------------
* Hugging Face ``cais/mmlu`` exports: ``.jsonl``, ``.json`` (a list of rows, or ``{"test": [...]}``),
  ``.csv`` with a header, or ``.parquet`` (only when ``pyarrow`` is importable), with columns
  ``question``, ``subject``, ``choices`` (a list of 4 strings; in CSV a JSON or Python list literal)
  and ``answer`` (0-3, or a letter). A folder of such files is read file by file.
* The original release: a folder of ``<subject>_test.csv`` files without a header, each row
  ``question, A, B, C, D, answer letter``.
"""

from __future__ import annotations

import ast
import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from ..errors import PrismError

log = logging.getLogger(__name__)

LETTERS = ("A", "B", "C", "D")
DEFAULT_DIR = Path("..") / "shared" / "benchmarks"
DEFAULT_FILES = {
    "mtbench": "mt_bench_questions.jsonl",
    "harmbench": "harmbench_behaviors.csv",
    "jailbreak": "jailbreak_prompts.json",
    "pku": "pku_saferlhf_prompts.json",
}
SAFETY_BENCHMARKS = ("harmbench", "jailbreak", "pku")
MMLU_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")


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


def default_path(benchmark: str) -> Path:
    """``../shared/benchmarks/<file>`` relative to the working directory."""
    return DEFAULT_DIR / DEFAULT_FILES[benchmark]


def _need_file(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise PrismError(f"{what} file not found: {p}")
    if p.is_file() and p.stat().st_size == 0:
        raise PrismError(f"{what} file is empty: {p}")
    return p


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
    import re

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


def _mmlu_row(row: dict, where: str, index: int, default_subject: str = "") -> MMLUItem:
    if not isinstance(row, dict):
        raise PrismError(f"{where}: expected an object with question, subject, choices, answer")
    if "choices" not in row and all(k in row for k in LETTERS):
        row = dict(row, choices=[row[k] for k in LETTERS])
    missing = [k for k in ("question", "choices", "answer") if k not in row]
    if missing:
        raise PrismError(f"{where}: missing column(s) {', '.join(missing)} "
                         f"(the cais/mmlu layout has question, subject, choices, answer)")
    question = str(row["question"] or "").strip()
    if not question:
        raise PrismError(f"{where}: empty question")
    subject = str(row.get("subject") or default_subject or "unknown").strip()
    return MMLUItem(f"{subject}/{index}", subject, question, _choices(row["choices"], where),
                    _answer_index(row["answer"], where))


def _read_hf_rows(path: Path) -> list[tuple[str, dict]]:
    """(where, row) pairs of one cais/mmlu export file."""
    suffix = path.suffix.lower()
    text_needed = suffix in (".jsonl", ".json", ".csv")
    text = path.read_text(encoding="utf-8-sig") if text_needed else ""
    if text_needed and not text.strip():
        raise PrismError(f"MMLU file is empty: {path}")
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{n}", json.loads(line)))
            except ValueError as exc:
                raise PrismError(f"{path}:{n}: not valid JSON ({exc})") from None
        return rows
    if suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise PrismError(f"{path}: not valid JSON ({exc})") from None
        if isinstance(data, dict):
            data = data.get("test") or data.get("rows") or data.get("data")
        if not isinstance(data, list):
            raise PrismError(f"{path}: expected a JSON list of rows (or an object with a 'test' list)")
        return [(f"{path}: row {i + 1}", r) for i, r in enumerate(data)]
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines(keepends=True))
        if not reader.fieldnames or "question" not in reader.fieldnames:
            raise PrismError(f"{path}: a cais/mmlu CSV needs a header with question, subject, choices, answer "
                             f"(got {reader.fieldnames}); a header-less file must be named <subject>_test.csv")
        return [(f"{path}:{reader.line_num}", dict(r)) for r in reader]
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise PrismError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), "
                             f"or export the split to .jsonl/.csv") from None
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow's own errors
            raise PrismError(f"{path}: cannot read parquet ({exc})") from None
        return [(f"{path}: row {i + 1}", r) for i, r in enumerate(rows)]
    raise PrismError(f"{path}: unsupported MMLU file type; use {', '.join(MMLU_EXTENSIONS)}")


def _read_original_csv(path: Path, subject: str) -> list[MMLUItem]:
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise PrismError(f"MMLU file is empty: {path}")
    items = []
    reader = csv.reader(text.splitlines(keepends=True))
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if not row or not any(c.strip() for c in row):
            continue
        if len(row) != 6:
            raise PrismError(f"{where}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
        letter = row[5].strip().upper()
        if letter not in LETTERS:
            raise PrismError(f"{where}: bad answer letter {row[5]!r}; expected A, B, C or D")
        items.append(MMLUItem(f"{subject}/{len(items)}", subject, row[0].strip(), tuple(c.strip() for c in row[1:5]),
                              LETTERS.index(letter)))
    return items


def load_mmlu(path: str | Path, subjects: Optional[Iterable[str]] = None, limit: Optional[int] = None) -> list[MMLUItem]:
    """MMLU test items from a cais/mmlu export (file or folder) or an original ``*_test.csv`` folder.

    ``subjects`` keeps only those subjects (an unknown name is an error); ``limit`` keeps at most that
    many items, spread round-robin over subjects.
    """
    p = _need_file(path, "MMLU")
    items: list[MMLUItem] = []
    if p.is_dir():
        originals = sorted(p.glob("*_test.csv"))
        if originals:
            for f in originals:
                items.extend(_read_original_csv(f, f.name[: -len("_test.csv")]))
        else:
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in MMLU_EXTENSIONS)
            files = [f for f in files if "test" in f.name] or files  # prefer the test split
            if not files:
                raise PrismError(f"{p}: no MMLU files found (expected <subject>_test.csv files, or "
                                 f"cais/mmlu exports: {', '.join(MMLU_EXTENSIONS)})")
            for f in files:
                items.extend(_hf_items(f))
    else:
        items = _hf_items(p)
    if not items:
        raise PrismError(f"{p}: no MMLU questions in it")
    items = _renumber(items)
    if subjects:
        wanted = [s.strip() for s in subjects if s.strip()]
        have = {it.subject for it in items}
        unknown = sorted(set(wanted) - have)
        if unknown:
            raise PrismError(f"unknown MMLU subject(s) {', '.join(unknown)}; the data has: "
                             f"{', '.join(sorted(have)[:12])}{' ...' if len(have) > 12 else ''}")
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


def _hf_items(path: Path) -> list[MMLUItem]:
    if path.suffix.lower() == ".csv" and path.name.endswith("_test.csv"):
        with open(path, encoding="utf-8-sig") as fh:
            first = fh.readline()
        if not first.lower().startswith("question"):
            return _read_original_csv(path, path.name[: -len("_test.csv")])
    return [_mmlu_row(row, where, 0) for where, row in _read_hf_rows(path)]


# --------------------------------------------------------------------------------------------------
# MT-Bench


def load_mtbench(path: str | Path | None = None, categories: Optional[Iterable[str]] = None,
                 limit: Optional[int] = None) -> list[MTBenchItem]:
    """MT-Bench questions (``question_id``, ``category``, ``turns`` [, ``reference``]) from JSONL."""
    p = _need_file(path or default_path("mtbench"), "MT-Bench")
    items = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise PrismError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(row, dict):
            raise PrismError(f"{where}: expected an object with question_id, category, turns")
        missing = [k for k in ("question_id", "category", "turns") if k not in row]
        if missing:
            raise PrismError(f"{where}: missing field(s) {', '.join(missing)}")
        turns = row["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise PrismError(f"{where}: 'turns' must be a non-empty list of strings")
        ref = row.get("reference") or []
        items.append(MTBenchItem(str(row["question_id"]), str(row["category"]), tuple(turns),
                                 tuple(str(r) for r in ref) if isinstance(ref, list) else ()))
    if not items:
        raise PrismError(f"MT-Bench file has no questions: {p}")
    if categories:
        wanted = {c.strip() for c in categories if c.strip()}
        items = [it for it in items if it.category in wanted]
    return take_stratified(items, lambda it: it.category, limit)


# --------------------------------------------------------------------------------------------------
# safety prompt sets


def _load_harmbench(p: Path) -> list[SafetyItem]:
    text = p.read_text(encoding="utf-8-sig")
    reader = csv.DictReader(text.splitlines(keepends=True))
    if not reader.fieldnames or "Behavior" not in reader.fieldnames:
        raise PrismError(f"{p}: a HarmBench CSV needs a 'Behavior' column (got {reader.fieldnames})")
    items = []
    for row in reader:
        where = f"{p}:{reader.line_num}"
        behavior = (row.get("Behavior") or "").strip()
        if not behavior:
            raise PrismError(f"{where}: empty Behavior")
        context = (row.get("ContextString") or "").strip()
        prompt = f"{context}\n\n---\n\n{behavior}" if context else behavior
        bid = (row.get("BehaviorID") or "").strip() or str(len(items))
        cat = (row.get("SemanticCategory") or row.get("FunctionalCategory") or "").strip()
        items.append(SafetyItem(f"harmbench/{bid}", "harmbench", prompt, cat))
    return items


def _load_prompt_list(p: Path, benchmark: str) -> list[SafetyItem]:
    """A JSON list of prompt strings (or of objects with a prompt/text/goal field), or JSONL of them."""
    text = p.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
        rows = [(f"{p}: item {i + 1}", r) for i, r in enumerate(data)] if isinstance(data, list) else None
    except ValueError:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((f"{p}:{n}", json.loads(line)))
                except ValueError as exc:
                    raise PrismError(f"{p}:{n}: not valid JSON ({exc})") from None
    if rows is None:
        raise PrismError(f"{p}: expected a JSON list of prompts")
    items = []
    for where, r in rows:
        cat = ""
        if isinstance(r, dict):
            cat = str(r.get("category", "") or "")
            r = next((r[k] for k in ("prompt", "text", "goal", "query", "question") if k in r), None)
        if not isinstance(r, str) or not r.strip():
            raise PrismError(f"{where}: expected a non-empty prompt string")
        items.append(SafetyItem(f"{benchmark}/{len(items)}", benchmark, r.strip(), cat))
    return items


def load_safety(benchmark: str, path: str | Path | None = None, limit: Optional[int] = None) -> list[SafetyItem]:
    """Prompts of one safety set: ``harmbench`` (CSV), ``jailbreak`` or ``pku`` (JSON list)."""
    if benchmark not in SAFETY_BENCHMARKS:
        raise PrismError(f"unknown safety benchmark '{benchmark}'; choose from {', '.join(SAFETY_BENCHMARKS)}")
    p = _need_file(path or default_path(benchmark), f"{benchmark}")
    items = _load_harmbench(p) if p.suffix.lower() == ".csv" else _load_prompt_list(p, benchmark)
    if not items:
        raise PrismError(f"{benchmark} file has no prompts: {p}")
    return items[:limit] if limit is not None else items
