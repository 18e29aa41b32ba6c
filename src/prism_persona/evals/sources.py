"""Where benchmark rows come from: the Hugging Face hub by default, a local file or folder as override.

A benchmark declares its hub datasets in its class (``Benchmark.hub``: ``{member: HubDataset}``), read
with the ``datasets`` library (``load_dataset(repo, config, split=...)``, cached by ``datasets`` in its
usual cache), and a flag that points at a local copy instead (its own, or ``--data NAME=PATH``). When
the hub cannot be reached (no network, ``HF_HUB_OFFLINE=1`` without a cached copy, ``datasets`` not
installed) loading stops with one line that names the flag.

Local files are read with the proper parsers, never by splitting text into lines with
``str.splitlines()`` (which also breaks at U+0085, U+2028 and friends inside a field):

* ``.jsonl``: records separated by ``"\\n"`` only (a raw U+2028 inside a JSON string stays in it);
* ``.json``: a list of records (or ``{"test"|"train"|"rows"|"data"|"questions": [...]}``);
* ``.csv`` / ``.tsv``: the ``csv`` module over the whole text (quoted newlines, commas and quotes);
* ``.parquet``: ``pyarrow``.

All text is decoded as UTF-8 with an optional byte-order mark.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config import check_text
from ..errors import PrismError
from ..userfiles import csv_checked, jsonl_rows

RECORD_EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
JSON_LIST_KEYS = ("test", "train", "rows", "data", "questions", "behaviors", "prompts")

Row = tuple  # (where: str, record: dict | str)


@dataclass(frozen=True)
class HubDataset:
    """One dataset on the Hugging Face hub (a benchmark declares its own in ``Benchmark.hub``) and the flag
    that replaces it with a local copy (empty: ``--data NAME=PATH``, which every benchmark has)."""

    repo: str
    config: Optional[str]
    split: str
    flag: str = ""

    @property
    def label(self) -> str:
        cfg = f"{self.config}, " if self.config else ""
        return f"{self.repo} ({cfg}split {self.split})"

    def override(self, source: str) -> str:
        """How the user passes a local copy instead (``--pku PATH``, ``--data toy=PATH``)."""
        return f"{self.flag} PATH" if self.flag else f"--data {source}=PATH"


def hub_rows(source: str) -> list[Row]:
    """``[(where, record), ...]`` of the hub dataset a registered benchmark declares for ``source`` (a
    member, or a benchmark's name: ``Benchmark.hub``); one-line error naming the override."""
    from .benchmarks import hub_dataset  # the registered benchmarks (imported on use: they import this module)

    ds = hub_dataset(source)
    if ds is None:
        raise PrismError(f"{source} has no Hugging Face dataset: pass a local copy with --data {source}=PATH")
    try:
        import datasets
    except ImportError:
        raise PrismError(
            f"{source}: reading {ds.repo} from the hub needs the 'datasets' package "
            f"(pip install 'prism-persona[data]'), or pass a local copy with {ds.override(source)}"
        ) from None
    try:
        data = datasets.load_dataset(ds.repo, ds.config, split=ds.split)
    except Exception as exc:  # offline, unknown repo, gated dataset, ...: the message says what to do
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise PrismError(
            f"cannot load {ds.label} from the Hugging Face hub ({reason}); pass a local copy with {ds.override(source)}"
        ) from None
    return [(f"{ds.repo} row {i + 1}", dict(r)) for i, r in enumerate(data)]


# --------------------------------------------------------------------------------------------------
# local files


def need_path(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise PrismError(f"{what} file not found: {p}")
    if p.is_file() and p.stat().st_size == 0:
        raise PrismError(f"{what} file is empty: {p}")
    return p


def read_text(path: Path, what: str) -> str:
    """The file as text (UTF-8, a leading BOM dropped); one-line error for other encodings."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PrismError(f"{what} file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise PrismError(f"{what} file is empty: {path}")
    return text


def read_records(path: str | Path, what: str) -> list[Row]:
    """``[(where, record), ...]`` of one .jsonl/.json/.csv/.tsv/.parquet file (a record is a dict, or a
    string for a JSON list of strings); ``where`` names the file and line or item for error messages."""
    p = need_path(path, what)
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        return bounded(_parquet_records(p))
    if suffix not in RECORD_EXTENSIONS:
        raise PrismError(f"{p}: unsupported {what} file type '{suffix}'; use {', '.join(RECORD_EXTENSIONS)}")
    text = read_text(p, what)
    if suffix in (".csv", ".tsv"):
        rows = list(csv_records(p, text, "\t" if suffix == ".tsv" else ","))
    elif suffix == ".jsonl":
        rows = list(jsonl_records(p, text))
    else:
        rows = json_records(p, text)
    return bounded(rows)


def bounded(rows: list[Row]) -> list[Row]:
    """Every text of a set item is within the one length rule (:func:`config.check_text`), checked as
    the file is read: a 200,000-character item is one line, not a generation running for minutes."""
    for where, rec in rows:
        for key, value in rec.items() if isinstance(rec, dict) else [("item", rec)]:
            if isinstance(value, str):
                check_text(value, f"{where}: {key!r}")
    return rows


def jsonl_records(p: Path, text: str) -> Iterable[Row]:
    """JSON Lines (:func:`prism_persona.userfiles.jsonl_rows`), each row named ``path:line``."""
    for n, row in jsonl_rows(text, lambda n, why: f"{p}:{n}: not valid JSON ({why})"):
        yield f"{p}:{n}", row


def json_records(p: Path, text: str) -> list[Row]:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        # a .json file that is really JSON Lines (or not JSON: jsonl_records names the line)
        return list(jsonl_records(p, text))
    if isinstance(data, dict):
        data = next((data[k] for k in JSON_LIST_KEYS if isinstance(data.get(k), list)), None)
    if not isinstance(data, list):
        raise PrismError(
            f"{p}: expected a JSON list of records (or an object with a {'/'.join(JSON_LIST_KEYS[:3])} list)"
        )
    return [(f"{p}: item {i + 1}", r) for i, r in enumerate(data)]


def csv_records(p: Path, text: str, delimiter: str = ",") -> Iterable[Row]:
    """Header-named records of a CSV/TSV text (the csv module reads quoted newlines, commas, quotes)."""
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    if not reader.fieldnames:
        raise PrismError(f"{p}: no header row")
    for row in csv_checked(p, reader):
        yield f"{p}:{reader.line_num}", {(k or "").strip(): v for k, v in row.items()}


def csv_rows(p: Path, text: str) -> Iterable[tuple[str, list]]:
    """Header-less CSV rows as lists (``where`` = file:line of the row's last physical line)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    for row in csv_checked(p, reader):
        yield f"{p}:{reader.line_num}", row


def _parquet_records(p: Path) -> list[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PrismError(
            f"{p}: reading parquet needs pyarrow (pip install pyarrow), or export the split to .jsonl/.csv"
        ) from None
    try:
        rows = pq.read_table(p).to_pylist()
    except Exception as exc:  # pyarrow's own errors
        raise PrismError(f"{p}: cannot read parquet ({exc})") from None
    return [(f"{p}: row {i + 1}", r) for i, r in enumerate(rows)]


def folder_records(folder: Path, what: str) -> list[Row]:
    """Records of every data file in a folder (sorted; files with 'test' in the name preferred)."""
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in RECORD_EXTENSIONS)
    files = [f for f in files if "test" in f.name] or files
    if not files:
        raise PrismError(f"{folder}: no {what} files in it (expected {', '.join(RECORD_EXTENSIONS)})")
    out: list[Row] = []
    for f in files:
        out.extend(read_records(f, what))
    return out


def rows_from(source: str, path: str | Path | None, what: str) -> list[Row]:
    """The override file/folder when given, else the hub dataset of ``source`` (:func:`hub_rows`)."""
    if path is None or str(path) == "":
        return hub_rows(source)
    p = need_path(path, what)
    return folder_records(p, what) if p.is_dir() else read_records(p, what)
