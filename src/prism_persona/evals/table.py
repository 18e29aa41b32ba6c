"""The paper's Table 1 from one `prism eval` run: one row per system (base, expert persona prompt, the
always-on LoRA = the paper's ungated "SFT" row, PRISM, oracle), one column per measured benchmark member
(refusal on harmful requests, over-refusal on benign ones, MMLU accuracy, MT-Bench score), every cell a
bootstrap 95% CI; paired tests PRISM vs base and PRISM vs persona on the same items (exact McNemar on
binary outcomes, a paired bootstrap CI of the difference otherwise); and PRISM's routed share per
column and per category -- the share of answers the adapter actually ran on (the gate's recorded
decision, :mod:`.gates`: a query the probability would route but that lies outside the gate's region
counts unrouted), with the share the gate abstained on where it can abstain, and for a K-way artifact
the share routed to each persona.

Everything comes from ``per_item.json`` (the per-item values behind every mean, and the gate's decision
on each PRISM answer), so it is recomputed without generating or judging anything. A ``per_item.json``
from before the decision was recorded holds the probability alone: routed then means ``p >= threshold``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from ..stats import bootstrap_ci, exact_mcnemar_p, paired_diff_ci
from .base import owner
from .format import fmt_ci, md_table
from .gates import abstained as gate_abstained
from .gates import decided
from .gates import persona as gate_persona
from .gates import personas as gate_personas
from .sweep import category_of, member_values

ROWS = {
    "base": "base model",
    "persona": "expert persona prompt",
    "lora": "always-on LoRA (SFT)",
    "prism": "PRISM",
    "oracle": "oracle (better of base and LoRA per item)",
}
COMPARISONS = ("base", "persona")
"""The systems PRISM is tested against."""
ALPHA = 0.05


def paper_table(
    results: dict, per_item: dict, bench, threshold: Optional[float], personas: Sequence[Optional[str]] = ()
) -> dict:
    """``{"columns": [...], "rows": {system: {column: CI}}, "tests": {other: {column: test}},
    "routing": {column: CI}, "abstained": {column: CI}, "personas": {persona: {column: CI}},
    "categories": [...]}`` (see the module docstring). ``abstained``: only where the records say whether
    the gate abstained; ``personas``: a K-way artifact's (``personas``: its persona names, in its order;
    names the records hold are added)."""
    resamples, seed = int(results.get("n_resamples") or 1000), int(results.get("seed") or 0)

    def ci(values: Sequence[float]) -> dict:
        return bootstrap_ci(values, n_resamples=resamples, seed=seed)

    systems = [s for s in ROWS if s in results.get("systems", [])]
    cats = category_of(bench)
    gates = (per_item.get("gate") or {}).get("prism", {})
    names = gate_personas([r for recs in gates.values() for r in recs.values()], personas)
    table: dict = {
        "columns": [],
        "rows": {s: {} for s in systems},
        "tests": {},
        "routing": {},
        "abstained": {},
        "personas": {n: {} for n in names},
        "persona_order": names,  # table1.json sorts the keys of "personas"
        "categories": [],
    }
    for key in cats:
        vals = {s: member_values(per_item, key, s) for s in systems}
        if not any(vals.values()):
            continue
        table["columns"].append({"key": key, "label": owner(key).label(key), "percent": owner(key).percent})
        for s in systems:
            table["rows"][s][key] = ci(list(vals[s].values()))
        for other in COMPARISONS:
            if "prism" in vals and other in vals:
                table["tests"].setdefault(other, {})[key] = paired_test(vals["prism"], vals[other], resamples, seed)
        recs = gates.get(key, {})
        routed = {i: float(decided(r, threshold)) for i, r in recs.items()}
        if routed:
            table["routing"][key] = ci(list(routed.values()))
            held = [a for a in map(gate_abstained, recs.values()) if a is not None]
            if held:
                table["abstained"][key] = ci([float(a) for a in held])
            for n in names:
                table["personas"][n][key] = ci([float(gate_persona(r) == n) for r in recs.values()])
            table["categories"] += category_rows(key, cats[key], routed, vals, ci, recs, names)
    return table


def paired_test(a: dict, b: dict, resamples: int, seed: int) -> dict:
    """``a`` vs ``b`` on their common items: the mean difference, and for 0/1 outcomes the discordant
    counts and the exact McNemar p, otherwise the paired bootstrap CI of the difference."""
    ids = [i for i in a if i in b]
    xs, ys = [a[i] for i in ids], [b[i] for i in ids]
    out: dict = {"n": len(ids), "diff": (sum(xs) - sum(ys)) / len(ids) if ids else None}
    if all(v in (0.0, 1.0) for v in xs + ys):
        better = sum(1 for x, y in zip(xs, ys) if x > y)
        worse = sum(1 for x, y in zip(xs, ys) if x < y)
        out.update(test="mcnemar", a_only=better, b_only=worse, p=exact_mcnemar_p(better, worse))
        out["significant"] = out["p"] < ALPHA
    else:
        d = paired_diff_ci(xs, ys, n_resamples=resamples, seed=seed)
        out.update(test="paired bootstrap", lo=d["lo"], hi=d["hi"])
        out["significant"] = bool(ids) and (d["lo"] > 0 or d["hi"] < 0)
    return out


def category_rows(
    key: str, cats: dict, routed: dict, vals: dict, ci, recs: Optional[dict] = None, names: Sequence[str] = ()
) -> list[dict]:
    """Per category of one column: its routed share, each system's value, and from the gate records
    ``recs`` the abstained share (where recorded) and, per persona of ``names``, the share routed to it
    (``personas``)."""
    rows = []
    recs = recs or {}
    for cat in sorted(set(cats.values())):
        ids = [i for i, c in cats.items() if c == cat and i in routed]
        if not ids:
            continue
        row = {"column": key, "category": cat, "n": len(ids), "routed": ci([routed[i] for i in ids])}
        held = [a for a in (gate_abstained(recs[i]) for i in ids if i in recs) if a is not None]
        if held:
            row["abstained"] = ci([float(a) for a in held])
        if names:
            row["personas"] = {n: ci([float(gate_persona(recs.get(i, 0.0)) == n) for i in ids]) for n in names}
        for s, v in vals.items():
            row[s] = sum(v[i] for i in ids if i in v) / len(ids) if all(i in v for i in ids) else None
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------
# markdown


def table_markdown(table: dict) -> str:
    """Table 1, the paired tests and the per-category routing as a ``report.md`` section."""
    cols = table["columns"]
    if not cols or not table["rows"]:
        return ""
    head = ["system"] + [c["label"] for c in cols]
    rows = [
        [ROWS[s]] + [fmt_ci(vals.get(c["key"]), pct=c["percent"]) for c in cols] for s, vals in table["rows"].items()
    ]
    if table["routing"]:
        what = "an adapter" if table.get("personas") else "the LoRA"
        rows.append(
            [f"PRISM: share routed to {what}"] + [fmt_ci(table["routing"].get(c["key"]), pct=True) for c in cols]
        )
        for name, by in (table.get("personas") or {}).items():
            rows.append([f"PRISM: share routed to {name}"] + [fmt_ci(by.get(c["key"]), pct=True) for c in cols])
        if table.get("abstained"):
            rows.append(
                ["PRISM: share abstained (to the base model)"]
                + [fmt_ci(table["abstained"].get(c["key"]), pct=True) for c in cols]
            )
    parts = ["## The paper's Table 1", "", md_table(head, rows), ""]
    for other, tests in table["tests"].items():
        cells = [_test_text(tests.get(c["key"]), c["percent"]) for c in cols]
        parts += [f"PRISM vs {ROWS[other]} (paired, same items; * = p < {ALPHA} / CI excludes 0):", ""]
        parts += [md_table(["test"] + [c["label"] for c in cols], [["PRISM - " + other] + cells]), ""]
    if table["categories"]:
        systems = list(table["rows"])
        label = {c["key"]: c["label"] for c in cols}
        names = list(table.get("personas") or {})
        held = any("abstained" in r for r in table["categories"])
        rows = [
            [label[r["column"]], r["category"], str(r["n"]), fmt_ci(r["routed"], pct=True)]
            + [fmt_ci((r.get("personas") or {}).get(n), pct=True) for n in names]
            + ([fmt_ci(r.get("abstained"), pct=True)] if held else [])
            + [_value(r.get(s), owner(r["column"]).percent) for s in systems]
            for r in table["categories"]
        ]
        head = ["column", "category", "n", "routed"] + [f"to {n}" for n in names] + (["abstained"] if held else [])
        parts += ["Routing per category (PRISM's recorded decisions) and each system's mean there:", ""]
        parts += [md_table(head + systems, rows), ""]
    return "\n".join(parts)


def _test_text(t: Optional[dict], pct: bool) -> str:
    if not t or not t["n"]:
        return "-"
    k, unit = (100.0, " pts") if pct else (1.0, "")
    star = " *" if t["significant"] else ""
    if t["test"] == "mcnemar":
        return f"{k * t['diff']:+.1f}{unit} ({t['a_only']} items up, {t['b_only']} down; McNemar p={t['p']:.3g}){star}"
    return f"{k * t['diff']:+.2f}{unit} [{k * t['lo']:+.2f}, {k * t['hi']:+.2f}]{star}"


def _value(x: Optional[float], pct: bool) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.0f}%" if pct else f"{x:.2f}"
