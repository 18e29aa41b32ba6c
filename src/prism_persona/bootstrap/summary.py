"""The bootstrap summary: outcomes per domain, judge diagnostics, tokens and speed.

Judge diagnostics (all shares in [0, 1], ``None`` when there is nothing to measure):

* ``flip_rate`` -- pairs whose outcome changes when the two answers swap places, among pairs whose
  two verdicts were both readable. A position-consistent judge has 0; a coin flip about 0.5+.
* ``position_a_rate`` -- single verdicts that chose A, among those that chose A or B (0.5 = no
  position bias).
* ``longer_wins`` -- pairs won outright (persona or base) by the longer answer, among those whose
  answers differ in length (0.5 = no length bias).
* ``tie_rate`` / ``unparseable_rate`` -- pairs whose outcome is tie / unparseable.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

from ..text import is_loop

OUTCOME_COLUMNS = (
    ("wins", "persona"),
    ("losses", "base"),
    ("ties", "tie"),
    ("mixed", "mixed"),
    ("unparseable", "unparseable"),
)


def _share(num: int, den: int) -> Optional[float]:
    return round(num / den, 4) if den else None


def outcome_counts(records: Iterable[dict]) -> dict:
    recs = list(records)
    row = {"queries": len(recs)}
    for col, winner in OUTCOME_COLUMNS:
        row[col] = sum(1 for r in recs if r["winner"] == winner)
    row["win_rate"] = _share(row["wins"], row["queries"])
    return row


def judge_diagnostics(records: Iterable[dict]) -> dict:
    recs = list(records)
    readable = [r for r in recs if r["winner"] != "unparseable"]
    letters = [v["winner"] for r in recs for v in r["verdicts"] if v["winner"] in ("A", "B")]
    decided = [r for r in recs if r["winner"] in ("persona", "base") and r["persona_chars"] != r["base_chars"]]
    longer = sum(1 for r in decided if (r["winner"] == "persona") == (r["persona_chars"] > r["base_chars"]))
    return {
        "pairs": len(recs),
        "flip_rate": _share(sum(1 for r in readable if r["winner"] == "mixed"), len(readable)),
        "position_a_rate": _share(sum(1 for x in letters if x == "A"), len(letters)),
        "longer_wins": _share(longer, len(decided)),
        "tie_rate": _share(sum(1 for r in recs if r["winner"] == "tie"), len(recs)),
        "unparseable_rate": _share(sum(1 for r in recs if r["winner"] == "unparseable"), len(recs)),
    }


def build_summary(
    domains: list[str],
    verdicts: list[dict],
    answers: list[dict],
    *,
    personas: dict,
    queries: dict,
    target: int,
    tokens: dict,
    judge: str,
    mode: Optional[str],
    model: str,
    wall_seconds: float,
    run: str,
) -> dict:
    by_domain = {d: outcome_counts(r for r in verdicts if r["domain"] == d) for d in domains}
    for d in domains:
        by_domain[d]["queries_collected"] = queries.get(d, 0)
    return {
        "run": run,
        "model": model,
        "judge": judge,
        "judge_mode": mode,
        "domains": by_domain,
        "total": outcome_counts(verdicts),
        "judge_diagnostics": judge_diagnostics(verdicts),
        "personas": personas,
        "queries_per_persona": target,
        "answers": {
            "pairs": len(answers),
            "mean_base_tokens": _mean(a["base_tokens"] for a in answers),
            "mean_persona_tokens": _mean(a["persona_tokens"] for a in answers),
            "cut_at_token_limit": sum(
                (a["base_finish"] == "length") + (a["persona_finish"] == "length") for a in answers
            ),
            "looping": {
                "base": sum(is_loop(a.get("base_answer") or "") for a in answers),
                "persona": sum(is_loop(a.get("persona_answer") or "") for a in answers),
            },
        },
        "tokens": tokens,
        "wall_seconds": round(wall_seconds, 2),
    }


def _mean(values: Iterable[float]) -> Optional[float]:
    vals = list(values)
    return round(sum(vals) / len(vals), 1) if vals else None


def fmt_cell(v) -> str:
    """A table cell: ``-`` for missing, three decimals for floats."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _num(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    cells = [header] + [[fmt_cell(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: (
        "| "
        + " | ".join(
            c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
            for i, (c, w) in enumerate(zip(r, widths))
        )
        + " |"
    )
    sep = "|" + "|".join(("-" * (w + 2)) if i == 0 else ("-" * (w + 1) + ":") for i, w in enumerate(widths)) + "|"
    return [line(cells[0]), sep] + [line(r) for r in cells[1:]]


def format_summary(s: dict) -> str:
    """A readable Markdown report (printed by the CLI and saved as ``summary.md``)."""
    cols = ["queries", "wins", "losses", "ties", "mixed", "unparseable", "win_rate"]
    rows = [[d] + [row[c] for c in cols] for d, row in s["domains"].items()]
    rows.append(["**total**"] + [s["total"][c] for c in cols])
    out = [
        f"# PRISM bootstrap: {s['model']}",
        "",
        f"Judge: {s['judge']} ({s['judge_mode'] or '-'}); a win = the persona answer won in both orders.",
        "",
    ]
    out += _table(["domain"] + cols, rows)
    d = s["judge_diagnostics"]
    out += ["", "## Judge diagnostics", ""]
    out += _table(
        ["measure", "value"],
        [
            ["pairs judged", d["pairs"]],
            ["flip rate (outcome changes when order is swapped)", d["flip_rate"]],
            ["position A rate (verdicts choosing A)", d["position_a_rate"]],
            ["longer answer wins", d["longer_wins"]],
            ["tie rate", d["tie_rate"]],
            ["unparseable rate", d["unparseable_rate"]],
        ],
    )
    t, p, a = s["tokens"], s["personas"], s["answers"]
    out += ["", "## Generation", ""]
    out += _table(
        ["measure", "value"],
        [
            [
                "personas from model / template fallback / file",
                f"{p.get('model', 0)} / {p.get('fallback', 0)} / {p.get('file', 0)}",
            ],
            ["answer pairs", a["pairs"]],
            ["mean tokens: base / persona answer", f"{_num(a['mean_base_tokens'])} / {_num(a['mean_persona_tokens'])}"],
            ["answers cut at the token limit", a["cut_at_token_limit"]],
            [
                "looping answers (a phrase 4+ times in a row): base / persona",
                f"{(a.get('looping') or {}).get('base', '-')} / {(a.get('looping') or {}).get('persona', '-')}",
            ],
            ["tokens generated (all invocations)", t["total"]["tokens_generated"]],
            ["generation seconds (all invocations)", t["total"]["generate_seconds"]],
            ["tokens/s", _num(t["total"]["tokens_per_s"])],
            ["wall seconds (this invocation)", s["wall_seconds"]],
        ],
    )
    return "\n".join(out) + "\n"
