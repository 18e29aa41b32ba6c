"""User-supplied training queries (``--queries-file``): the paper's self-generated queries stay the
default; with a file, its queries replace stage 2's generation (personas, answers and verdicts run as
usual on them).

Accepted formats, read with the proper parsers (never by splitting lines of text):

* ``.jsonl`` -- one object per line with ``domain`` and ``query`` (``prompt`` is accepted for ``query``);
* ``.json``  -- a list of such objects, or ``{domain: [query, ...]}``;
* ``.csv`` / ``.tsv`` -- a header row with ``domain`` and ``query`` columns.

Every problem is a one-line error naming the file and the row, raised before any model loads; so is a
query (or domain) holding a control, bidi or zero-width character or a chat-template token
(:func:`..text.unsafe_text_reason`): a user's file is refused, not silently cleaned.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..config import MAX_TEXT_CHARS
from ..errors import PrismError
from ..text import unsafe_text_reason
from ..userfiles import csv_checked, jsonl_rows, read_user_text

QUERY_FIELDS = ("query", "prompt")


def read_rows(path: str | Path, what: str = "queries file") -> list[tuple[str, dict]]:
    """``[(where, row dict), ...]`` of a .jsonl / .json / .csv / .tsv file (``where`` names the line or
    item for error messages); one-line errors for a missing, non-UTF-8 or malformed file."""
    p = Path(path).expanduser()
    text = read_user_text(p, what)
    suffix = p.suffix.lower()
    if suffix in (".csv", ".tsv"):
        rows = list(_csv_rows(p, text, "\t" if suffix == ".tsv" else ","))
    elif suffix == ".json":
        rows = list(_json_rows(p, text))
    else:
        rows = list(_jsonl_rows(p, text))
    for where, row in rows:
        if not isinstance(row, dict):
            raise PrismError(f"{p} {where}: expected an object with 'domain' and 'query'")
    if not rows:
        raise PrismError(f"{what} {p} holds no queries")
    return rows


def domain_and_query(path: str | Path, where: str, row: dict) -> tuple[str, str]:
    domain = row.get("domain")
    query = next((row[k] for k in QUERY_FIELDS if row.get(k) not in (None, "")), None)
    if not isinstance(domain, str) or not domain.strip():
        raise PrismError(f"{path} {where}: no 'domain'")
    if not isinstance(query, str) or not query.strip():
        raise PrismError(f"{path} {where}: no non-empty 'query'")
    if len(query) > MAX_TEXT_CHARS:
        raise PrismError(f"{path} {where}: the query has {len(query)} characters; at most {MAX_TEXT_CHARS}")
    for what, text in (("domain", domain), ("query", query)):
        why = unsafe_text_reason(text)
        if why:
            raise PrismError(f"{path} {where}: the {what} holds a {why}; remove it (it would reach the model)")
    return domain.strip(), query.strip()


def read_queries_file(path: str | Path) -> list[tuple[str, str]]:
    """``[(domain, query), ...]`` in file order (blank queries are an error, duplicates are kept here)."""
    return [domain_and_query(Path(path).expanduser(), where, row) for where, row in read_rows(path)]


def check_queries_file(path: str | Path, domains: Sequence[str]) -> list[tuple[str, str]]:
    """:func:`read_queries_file`, and every domain of the file must be in ``domains`` and vice versa."""
    pairs = read_queries_file(path)
    found = {d for d, _ in pairs}
    unknown = sorted(found - set(domains))
    if unknown:
        raise PrismError(f"queries file {path} has domains not in --domains: {', '.join(unknown)}")
    missing = [d for d in domains if d not in found]
    if missing:
        raise PrismError(f"queries file {path} has no queries for: {', '.join(missing)}")
    return pairs


def queries_file_hash(path: str | Path) -> str:
    return hashlib.sha1(Path(path).expanduser().read_bytes()).hexdigest()[:16]


def _jsonl_rows(p: Path, text: str) -> Iterable[tuple[str, object]]:
    for n, row in jsonl_rows(text, lambda n, why: f"{p} line {n} is not valid JSON ({why})"):
        yield f"line {n}", row


def _json_rows(p: Path, text: str) -> Iterable[tuple[str, object]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PrismError(f"{p} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise PrismError(f"{p} is not valid JSON (nested too deeply)") from None
    if isinstance(data, dict):
        for domain, queries in data.items():
            if not isinstance(queries, list):
                raise PrismError(f"{p}: '{domain}' must map to a list of queries")
            for i, q in enumerate(queries, 1):
                yield f"'{domain}' item {i}", {"domain": domain, "query": q}
    elif isinstance(data, list):
        for i, row in enumerate(data, 1):
            yield f"item {i}", row
    else:
        raise PrismError(f"{p}: expected a list of objects or {{domain: [queries]}}")


def _csv_rows(p: Path, text: str, delimiter: str) -> Iterable[tuple[str, object]]:
    import io

    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    fields = [f.strip().lower() for f in (reader.fieldnames or [])]
    if "domain" not in fields or not any(f in fields for f in QUERY_FIELDS):
        raise PrismError(f"{p}: the header must name a 'domain' and a 'query' column (found: {', '.join(fields)})")
    for row in csv_checked(p, reader):
        clean = {(k or "").strip().lower(): v for k, v in row.items()}
        yield f"line {reader.line_num}", clean
