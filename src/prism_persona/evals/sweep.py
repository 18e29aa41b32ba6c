"""The gate-threshold trade-off, computed from cached results without generating anything.

PRISM's answer to an item is exactly the base model's when the gate does not route it and exactly the
always-on LoRA's when it does (the gate decides once per conversation, from the prompt). So with the
per-item values of ``base`` and ``lora`` (MMLU correctness, MT-Bench judge score, refusal) and the gate's
decision on every item (recorded by the ``prism`` system, :mod:`.gates`), PRISM at any threshold ``t`` is::

    value_t(item) = lora(item) if gate_prob(item) >= t and not outside(item) else base(item)

``outside``: the query lies outside the gate's abstain region (or, K-way, below its persona-confidence
floor), so it stays on the base model at every threshold; recorded per item since the record exists. A
record without it counts a query outside when the gate abstained on it and inside otherwise (exact at
and above the artifact's threshold; below it, a query under the threshold that lies outside the region
would be counted routed); a bare probability (an older ``per_item.json``) is ``p >= t`` alone. For a
K-way artifact ``lora`` is the adapters forced on (each query's most probable persona), which is the
persona the gate routes a query to at any threshold. The threshold ``-inf`` is the always-on LoRA
(forced on every query, the region does not apply), ``inf`` the base model.

:func:`threshold_sweep` evaluates that at every threshold that changes a decision (midpoints between
sorted gate probabilities, plus "route nothing" = base and "route everything" = lora), and
:func:`tradeoff_figure` draws accuracy (MMLU) against alignment (MT-Bench score, refusal of harmful
requests, over-refusal of benign ones) with base, persona, always-on LoRA and PRISM at its trained
threshold marked. :func:`routing_vs_effect` is the paper's Figure 4: per benchmark category the share
PRISM routes against the persona's effect there, with Pearson r and Spearman rho.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from ..stats import pearson, spearman
from .base import owner
from .format import md_table, pyplot
from .gates import decided, prob, routed_at
from .gates import persona as gate_persona
from .gates import personas as gate_personas


def category_of(bench) -> dict:
    """member key -> {item_id: category} (MMLU group, MT-Bench category, the safety set's name)."""
    return {key: cats for benchmark, items in bench for key, cats in benchmark.categories(items).items()}


def member_values(per_item: dict, bench_key: str, system: str) -> dict:
    """item_id -> value of ``system`` on the items of one member (its benchmark's per-item table)."""
    benchmark = owner(bench_key)
    vals = per_item.get(benchmark.name, {}).get(system, {})
    if benchmark.members == (bench_key,):
        return dict(vals)
    prefix = f"{bench_key}/"
    return {k: v for k, v in vals.items() if k.startswith(prefix)}


def _label(key: str) -> str:
    return owner(key).label(key)


def _mean(values) -> Optional[float]:
    values = list(values)
    return sum(values) / len(values) if values else None


def thresholds(probs: Sequence[float]) -> list[float]:
    """+inf (route nothing), the midpoints between distinct sorted probabilities, and -inf (route all)."""
    ps = sorted(set(probs), reverse=True)
    mids = [(a + b) / 2 for a, b in zip(ps, ps[1:])]
    return [math.inf] + ([ps[0]] if ps else []) + mids + ([-math.inf] if ps else [])


def threshold_sweep(per_item: dict, bench, system: str = "prism", threshold: Optional[float] = None) -> dict:
    """``{"points": [{"threshold", "routed", <benchmark>: value, ...}], "marks": {...}, "benchmarks": [...]}``.

    Needs per-item values of ``base`` and ``lora`` and the gate probabilities of ``system``
    (``per_item["gate"][system]``); benchmarks missing either are left out.
    """
    gates = (per_item.get("gate") or {}).get(system, {})
    benches = []
    for key in category_of(bench):
        b, lo, g = member_values(per_item, key, "base"), member_values(per_item, key, "lora"), gates.get(key, {})
        ids = [i for i in b if i in lo and i in g]
        if ids:
            benches.append((key, ids, b, lo, g))
    if not benches:
        return {"points": [], "marks": {}, "benchmarks": []}
    all_probs = [prob(g[i]) for _, ids, _, _, g in benches for i in ids]
    points = [_point(t, benches) for t in thresholds(all_probs)]
    marks = {"base": _point(math.inf, benches), "lora": _point(-math.inf, benches)}
    if threshold is not None:
        marks["prism"] = _point(threshold, benches)
    persona = {}
    for key, ids, *_ in benches:
        pv = member_values(per_item, key, "persona")
        persona[key] = _mean(pv[i] for i in ids if i in pv)
    if any(v is not None for v in persona.values()):
        marks["persona"] = {"threshold": None, "routed": None, **persona}
    return {
        "points": points,
        "marks": marks,
        "benchmarks": [k for k, *_ in benches],
        "n": {k: len(ids) for k, ids, *_ in benches},
    }


def _point(t: float, benches) -> dict:
    out: dict = {"threshold": t if math.isfinite(t) else ("inf" if t > 0 else "-inf")}
    routed = total = 0
    for key, ids, b, lo, g in benches:
        on = {i: t == -math.inf or routed_at(g[i], t) for i in ids}  # -inf: the LoRA forced on every query
        vals = [lo[i] if on[i] else b[i] for i in ids]
        out[key] = sum(vals) / len(vals)
        routed += sum(on.values())
        total += len(ids)
    out["routed"] = routed / total if total else None
    return out


def routing_vs_effect(
    per_item: dict, bench, system: str = "prism", threshold: Optional[float] = None, persona: str = "persona"
) -> dict:
    """Per benchmark: per category the share ``system`` routes (its recorded decisions; a bare probability:
    ``p >= threshold``) and the persona's effect (persona - base, signed so that positive = the persona
    helps: on benign requests, where a refusal is an over-refusal, base - persona), with Pearson r and
    Spearman rho over the categories (the paper's Figure 4). A K-way artifact's points also hold
    ``personas``: ``{persona: share routed to it}``."""
    gates = (per_item.get("gate") or {}).get(system, {})
    out: dict = {}
    groups = {benchmark.name: list(benchmark.categories(items)) for benchmark, items in bench}
    cats_of = category_of(bench)
    for label, keys in groups.items():
        points = []
        by_cat: dict = {}
        for key in keys:
            if key not in cats_of:
                continue
            base, pers, g = (
                member_values(per_item, key, "base"),
                member_values(per_item, key, persona),
                gates.get(key, {}),
            )
            sign = 1.0 if owner(key).higher_is_better(key) else -1.0  # over-refusal: fewer is better
            for iid, cat in cats_of[key].items():
                if iid in base and iid in pers and iid in g:
                    by_cat.setdefault(cat, []).append((g[iid], sign * (pers[iid] - base[iid])))
        names = gate_personas([r for rows in by_cat.values() for r, _ in rows])
        for cat, rows in sorted(by_cat.items()):
            point = {
                "category": cat,
                "routed": sum(decided(r, threshold) for r, _ in rows) / len(rows),
                "effect": sum(e for _, e in rows) / len(rows),
                "n": len(rows),
            }
            if names:
                point["personas"] = {n: sum(gate_persona(r) == n for r, _ in rows) / len(rows) for n in names}
            points.append(point)
        if points:
            xs, ys = [p["routed"] for p in points], [p["effect"] for p in points]
            out[label] = {
                "points": points,
                "pearson": pearson(xs, ys) if len(points) >= 2 else None,
                "spearman": spearman(xs, ys) if len(points) >= 2 else None,
            }
    return out


# --------------------------------------------------------------------------------------------------
# figures


def tradeoff_figure(path: str | Path, sweep: dict) -> Optional[Path]:
    """One panel per alignment measure: MMLU accuracy (x) against it (y) along the threshold curve."""
    x = next((k for k in sweep.get("benchmarks", []) if owner(k).accuracy_axis), None)
    if x is None:
        return None
    ys = [k for k in sweep["benchmarks"] if k != x]
    if not ys:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(ys), figsize=(4.6 * len(ys) + 0.6, 4.2), squeeze=False)
    style = {"base": ("s", "#636363"), "persona": ("D", "#fd8d3c"), "lora": ("^", "#3182bd"), "prism": ("*", "#d62728")}
    for ax, key in zip(axes[0], ys):
        k = 100.0 if owner(key).percent else 1.0
        xs = [100 * p[x] for p in sweep["points"]]
        ax.plot(
            xs,
            [k * p[key] for p in sweep["points"]],
            "-o",
            color="#9ecae1",
            markersize=3,
            label="PRISM, threshold swept",
            zorder=1,
        )
        for name, (marker, color) in style.items():
            m = sweep["marks"].get(name)
            if m and m.get(x) is not None and m.get(key) is not None:
                ax.scatter(
                    [100 * m[x]],
                    [k * m[key]],
                    marker=marker,
                    s=110 if name == "prism" else 60,
                    color=color,
                    edgecolor="black",
                    linewidth=0.5,
                    label=name,
                    zorder=3,
                )
        ax.set_xlabel(f"{_label(x)} (%)")
        label = _label(key) + (" (%)" if owner(key).percent else "")
        ax.set_ylabel(label)
        ax.set_title(label + " vs accuracy", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle("Gate threshold trade-off (no regeneration: base/lora answers mixed by the gate)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def routing_effect_figure(path: str | Path, rv: dict) -> Optional[Path]:
    """One scatter per benchmark: % routed per category against the persona's effect there."""
    panels = [(k, v) for k, v in rv.items() if v["points"]]
    if not panels:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels) + 0.6, 4.2), squeeze=False)
    for ax, (label, v) in zip(axes[0], panels):
        xs = [100 * p["routed"] for p in v["points"]]
        ys = [p["effect"] for p in v["points"]]
        names = list(v["points"][0].get("personas") or {})
        ax.scatter(xs, ys, s=40, edgecolor="black", linewidth=0.5, label="any persona" if names else None, zorder=3)
        for k, name in enumerate(names):  # a K-way artifact: the share routed to each persona
            px = [100 * p["personas"][name] for p in v["points"]]
            ax.scatter(px, ys, s=22, marker="^v<>sD"[k % 6], label=name, alpha=0.8, zorder=2)
        if names:
            ax.legend(fontsize=7, loc="best")
        for p, x, y in zip(v["points"], xs, ys):
            ax.annotate(p["category"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.axhline(0, color="lightgray", linewidth=0.6)
        fmt = lambda r: "n/a" if r is None else f"{r:+.2f}"  # noqa: E731
        ax.set_title(f"{label}: Pearson {fmt(v['pearson'])}, Spearman {fmt(v['spearman'])}", fontsize=9)
        ax.set_xlim(-5, 105)
        ax.set_xlabel("% routed to " + ("an adapter / each persona" if names else "the LoRA"))
        ax.set_ylabel("persona effect (persona - base, + = helps)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def sweep_markdown(sweep: dict, rv: dict, figs: dict) -> str:
    if not sweep.get("points"):
        return ""
    keys = sweep["benchmarks"]
    label = {k: _label(k) for k in keys}
    parts = [
        "## Gate threshold trade-off (from cached answers, nothing regenerated)",
        "",
        "Rows: threshold (inf = route nothing = base, -inf = route everything = always-on LoRA); "
        "values mix base's and lora's per-item results by the recorded gate probabilities.",
        "",
    ]
    rows = []
    for name in ("base", "persona", "lora", "prism"):
        m = sweep["marks"].get(name)
        if m:
            rows.append(
                [f"**{name}**", _fmt_t(m.get("threshold")), _pct(m.get("routed"))] + [_val(k, m.get(k)) for k in keys]
            )
    step = max(1, len(sweep["points"]) // 12)
    for p in sweep["points"][::step]:
        rows.append(["", _fmt_t(p["threshold"]), _pct(p["routed"])] + [_val(k, p[k]) for k in keys])
    parts += [md_table(["mark", "threshold", "routed"] + [label[k] for k in keys], rows), ""]
    if "tradeoff" in figs:
        parts += [f"![tradeoff]({Path(figs['tradeoff']).name})", ""]
    if rv:
        parts += ["## Routing vs persona effect per category", ""]
        for b, v in rv.items():
            f = lambda r: "n/a" if r is None else f"{r:+.2f}"  # noqa: E731
            parts.append(
                f"- {b}: Pearson r = {f(v['pearson'])}, Spearman rho = {f(v['spearman'])} over "
                f"{len(v['points'])} categories"
            )
        parts.append("")
        if "routing_vs_effect_all" in figs:
            parts += [f"![routing vs effect]({Path(figs['routing_vs_effect_all']).name})", ""]
    return "\n".join(parts)


def _fmt_t(t) -> str:
    return "-" if t is None else (t if isinstance(t, str) else f"{t:.3f}")


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _val(key: str, x) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if owner(key).percent else f"{x:.2f}"


def write_sweep(run, per_item: dict, bench, threshold: Optional[float]) -> tuple[dict, dict, str]:
    """sweep.json, tradeoff.png and routing_vs_effect_all.png in the run directory; returns
    (sweep, routing-vs-effect, markdown section). Empty when the run has no gated system with base and lora."""
    sweep = threshold_sweep(per_item, bench, threshold=threshold)
    if not sweep["points"]:
        return sweep, {}, ""
    rv = routing_vs_effect(per_item, bench, threshold=threshold)
    run.write_json("sweep.json", {"sweep": sweep, "routing_vs_effect": rv, "threshold": threshold})
    figs = {}
    f = tradeoff_figure(run.root / "tradeoff.png", sweep)
    if f:
        figs["tradeoff"] = f
    f = routing_effect_figure(run.root / "routing_vs_effect_all.png", rv) if rv else None
    if f:
        figs["routing_vs_effect_all"] = f
    return sweep, rv, sweep_markdown(sweep, rv, figs)
