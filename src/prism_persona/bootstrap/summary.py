"""The bootstrap summary: outcomes per domain, judge diagnostics, tokens and speed.

Judge diagnostics (all shares in [0, 1], ``None`` when there is nothing to measure):

* ``flip_rate`` -- pairs whose outcome changes when the two answers swap places, among pairs whose
  two verdicts were both readable. A position-consistent judge has 0; a coin flip about 0.5+.
* ``position_a_rate`` -- single verdicts that chose A, among those that chose A or B (0.5 = no
  position bias).
* ``longer_wins`` -- pairs won outright (persona or base) by the longer answer, among those whose
  answers differ in length (0.5 = no length bias).
* ``order_agreement`` -- 1 - ``flip_rate``: pairs whose two orders gave the same outcome.
* ``tie_rate`` / ``unparseable_rate`` -- pairs whose outcome is tie / unparseable.
* ``blind`` -- why the judge cannot tell the answers apart (:data:`BLIND_RULE`), or ``None``.

The data report (:func:`data_report`) says per domain how many queries were requested, written and
usable, the wins and ties, the judge's order agreement and whether there are enough positives for a
gate (:data:`GATE_POSITIVES_RULE`).
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


BLIND_MIN_PAIRS = 4
BLIND_FLIP = 0.9
BLIND_POSITION = 0.95
BLIND_NO_VERDICT = 0.9
BLIND_RULE = (
    f"the judge is blind when, over at least {BLIND_MIN_PAIRS} pairs, the two orders disagree on "
    f"{BLIND_FLIP:.0%} or more of the readable pairs, or {BLIND_POSITION:.0%} or more of its A/B verdicts "
    f"name the same position, or {BLIND_NO_VERDICT:.0%} or more of the pairs are ties or unreadable"
)
BLIND_ADVICE = (
    "use a larger model (--model), a stronger judge model (--judge MODEL, e.g. served on a GPU with "
    "--engine vllm) or a rule judge (--judge file.py:function)"
)
MIN_GATE_POSITIVES = 4
GATE_POSITIVES_RULE = (
    f"a domain has enough positives for a gate with at least {MIN_GATE_POSITIVES} persona wins from a judge "
    f"that is not blind; the gate learns anything only when the run has at least {MIN_GATE_POSITIVES} wins and "
    f"{MIN_GATE_POSITIVES} non-wins in all (a domain with no wins is fine when the persona should not be used there)"
)


MARGIN_CAP = 30.0
"""Log-prob differences are clipped to +-this (an answer with no probability mass gives infinity)."""


def persona_margin(verdicts: list[dict]) -> Optional[float]:
    """How much the judge prefers the persona answer, in log-probability units averaged over both
    orders (``None`` without log-probabilities, e.g. text or rule judges). Averaging the two orders
    cancels a position bias: a judge that always says "A" by the same amount has margin 0."""
    parts = []
    for v in verdicts:
        d = v.get("detail") or {}
        if "logp_A" not in d or "logp_B" not in d:
            return None
        diff = max(-MARGIN_CAP, min(MARGIN_CAP, float(d["logp_A"]) - float(d["logp_B"])))
        if diff != diff:
            return None
        parts.append(diff if v["order"] == "persona_first" else -diff)
    return round(sum(parts) / len(parts), 4) if len(parts) == 2 else None


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
    flip = _share(sum(1 for r in readable if r["winner"] == "mixed"), len(readable))
    diag = {
        "pairs": len(recs),
        "flip_rate": flip,
        "order_agreement": None if flip is None else round(1 - flip, 4),
        "position_a_rate": _share(sum(1 for x in letters if x == "A"), len(letters)),
        "longer_wins": _share(longer, len(decided)),
        "tie_rate": _share(sum(1 for r in recs if r["winner"] == "tie"), len(recs)),
        "unparseable_rate": _share(sum(1 for r in recs if r["winner"] == "unparseable"), len(recs)),
    }
    margin_rule = bool(recs) and all(r.get("rule") == "margin" for r in recs)
    if margin_rule:  # the margin rule cancels the position prior: only "no verdict" can make it blind
        diag["rule"] = "margin"
    diag["blind"] = judge_blindness(diag, margin_rule)
    return diag


def judge_blindness(diag: dict, margin_rule: bool = False) -> Optional[str]:
    """Why the judge's verdicts cannot tell the answers apart (:data:`BLIND_RULE`), in words; ``None``
    when they can or when fewer than ``BLIND_MIN_PAIRS`` pairs were judged. ``margin_rule``: the
    verdicts were decided by the both-order margin, in which a position prior cancels, so only the
    share of pairs without a verdict (inside the abstain band, or unreadable) counts."""
    if diag["pairs"] < BLIND_MIN_PAIRS:
        return None
    flip, pos = diag["flip_rate"], diag["position_a_rate"]
    no_verdict = (diag["tie_rate"] or 0) + (diag["unparseable_rate"] or 0)
    if margin_rule:
        flip = pos = None
    if pos is not None and max(pos, 1 - pos) >= BLIND_POSITION:
        side = "A" if pos >= 0.5 else "B"
        return f"it chose position {side} in {max(pos, 1 - pos):.0%} of its verdicts, whichever answer stood there"
    if flip is not None and flip >= BLIND_FLIP:
        return f"its verdict changed with the order of the answers on {flip:.0%} of the pairs"
    if no_verdict >= BLIND_NO_VERDICT:
        return f"it gave no verdict (tie or unreadable) on {no_verdict:.0%} of the pairs"
    return None


def blind_warning(reason: str, judge: str = "the judge", debiased: Optional[str] = None) -> str:
    """The one-line warning for a blind judge; ``debiased`` (:func:`debiased_note`) says what the
    position-debiased margin of the same verdicts still sees."""
    tail = f"; {debiased}" if debiased else ""
    return f"{judge} cannot tell the answers apart ({reason}): its labels are noise{tail}; {BLIND_ADVICE}"


def debiased_note(records: Iterable[dict]) -> Optional[str]:
    """What the position-debiased judge sees in verdicts whose raw letters are blind: the share of
    pairs whose both-order margin (:func:`persona_margin`) prefers the persona, and the mean
    ``|margin|``; ``None`` without log-probabilities."""
    margins = [m for m in (persona_margin(r["verdicts"]) for r in records) if m is not None]
    if not margins:
        return None
    pos = sum(1 for m in margins if m > 0)
    mean_abs = sum(abs(m) for m in margins) / len(margins)
    return (
        f"its both-order log-prob margin, in which the position prior cancels, still prefers the persona on "
        f"{pos} of {len(margins)} pairs (mean |margin| {mean_abs:.3f}): judge.rule=margin decides by it"
    )


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
    query_stats: Optional[dict] = None,
    abstain_margin: float = 0.0,
) -> dict:
    by_domain = {d: outcome_counts(r for r in verdicts if r["domain"] == d) for d in domains}
    for d in domains:
        by_domain[d]["queries_collected"] = queries.get(d, 0)
    stats = query_stats or {d: {"usable": queries.get(d, 0)} for d in domains}
    return {
        "run": run,
        "model": model,
        "judge": judge,
        "judge_mode": mode,
        "domains": by_domain,
        "total": outcome_counts(verdicts),
        "judge_diagnostics": judge_diagnostics(verdicts),
        "debiased": debiased_note(verdicts),
        "data_report": data_report(domains, verdicts, stats, target, abstain_margin),
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


RULE_WORDS = {
    "both_orders": "a win = the persona answer won in both orders.",
    "margin": "a win = the persona's both-order log-prob margin is above the abstain band (judge.rule=margin).",
}


def d_rule(s: dict) -> str:
    """The rule that decided a summary's verdicts."""
    return (s.get("judge_diagnostics") or {}).get("rule", "both_orders")


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
        f"Judge: {s['judge']} ({s['judge_mode'] or '-'}); " + RULE_WORDS.get(d_rule(s), RULE_WORDS["both_orders"]),
        "",
    ]
    out += _table(["domain"] + cols, rows)
    d = s["judge_diagnostics"]
    if d.get("blind"):
        out += ["", f"**{blind_warning(d['blind'], 'The judge', s.get('debiased'))}.**"]
    out += ["", "## Judge diagnostics", ""]
    out += _table(
        ["measure", "value"],
        [
            ["pairs judged", d["pairs"]],
            ["flip rate (outcome changes when order is swapped)", d["flip_rate"]],
            ["order agreement (same outcome in both orders)", d.get("order_agreement")],
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
    if s.get("data_report"):
        out += [""] + format_data_report(s["data_report"])
    return "\n".join(out) + "\n"


def data_report(
    domains: list[str], verdicts: list[dict], query_stats: dict, target: int, abstain_margin: float = 0.0
) -> dict:
    """Per domain: queries requested / written (candidate lines) / usable, wins, ties, abstained
    pairs, the judge's order agreement and whether the domain has enough positives for a gate
    (:data:`GATE_POSITIVES_RULE`); plus ``enough_for_gate`` for the whole run."""
    blind = judge_diagnostics(verdicts)["blind"]
    rows = {}
    for d in domains:
        recs = [r for r in verdicts if r["domain"] == d]
        stats = query_stats.get(d, {})
        wins = sum(1 for r in recs if r["winner"] == "persona")
        rows[d] = {
            "requested": target,
            "written": stats.get("written"),
            "usable": stats.get("usable", 0),
            "dropped": stats.get("dropped", {}),
            "judged": len(recs),
            "wins": wins,
            "ties": sum(1 for r in recs if r["winner"] in ("tie", "mixed")),
            "abstained": sum(1 for r in recs if in_abstain_band(r, abstain_margin)),
            "order_agreement": judge_diagnostics(recs)["order_agreement"],
            "enough_positives": wins >= MIN_GATE_POSITIVES and not blind,
        }
    wins = sum(r["wins"] for r in rows.values())
    others = sum(r["judged"] for r in rows.values()) - wins
    return {
        "domains": rows,
        "judge_blind": blind,
        "enough_for_gate": not blind and wins >= MIN_GATE_POSITIVES and others >= MIN_GATE_POSITIVES,
        "rule": GATE_POSITIVES_RULE,
    }


def in_abstain_band(record: dict, band: float) -> bool:
    """True when the judge's margin (:func:`persona_margin`) of a verdict record is below ``band``."""
    if record.get("rule") == "margin":
        return record["winner"] == "tie"
    m = persona_margin(record["verdicts"]) if band > 0 else None
    return m is not None and abs(m) < band


def format_data_report(rep: dict) -> list[str]:
    """The data report as Markdown lines (a table, the rule and the verdict in words)."""
    cols = ["requested", "written", "usable", "judged", "wins", "ties", "abstained", "order_agreement"]
    rows = [[d] + [r[c] for c in cols] + ["yes" if r["enough_positives"] else "no"] for d, r in rep["domains"].items()]
    out = ["## Data report", ""]
    out += _table(["domain"] + cols + ["enough positives"], rows)
    out += ["", f"Rule: {rep['rule']}.", ""]
    if rep["judge_blind"]:
        out.append(f"**The labels are noise**: the judge cannot tell the answers apart ({rep['judge_blind']}).")
    elif not rep["enough_for_gate"]:
        out.append(
            "**Too few positives**: the gate will be constant; write more queries or use a judge that sees the effect."
        )
    else:
        out.append("Enough positives and negatives for a gate.")
    drops = {}
    for r in rep["domains"].values():
        for k, v in (r.get("dropped") or {}).items():
            drops[k] = drops.get(k, 0) + v
    if drops:
        out += ["", "Query lines dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(drops.items())) + "."]
    return out
