"""Markdown tables and matplotlib figures (Agg backend) for `prism eval` and `prism study`.

Every number is shown with its bootstrap 95% CI and sample count. Figures are written as PNG next to
the Markdown that embeds them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from .benchmarks import REGISTRY
from .format import fig_md, grouped_bars, ok, pyplot

# ------------------------------------------------------------------------------------------ text


def eval_markdown(results: dict, figures: dict, title: str = "PRISM evaluation", notes: Sequence[str] = ()) -> str:
    """The eval report: one section per benchmark (its own :meth:`~.base.Benchmark.markdown`), figures
    embedded by relative path."""
    parts = [f"# {title}", ""]
    parts += [f"- {n}" for n in notes]
    parts.append(
        f"- items: {', '.join(f'{k} {v}' for k, v in results.get('counts', {}).items())}; "
        f"95% CIs from {results.get('n_resamples')} bootstrap resamples (seed {results.get('seed')})."
    )
    if results.get("judge"):
        parts.append(f"- judge: `{results['judge'].get('judge')}` (mode {results['judge'].get('mode')})")
    parts.append("")
    for bench in REGISTRY.values():
        if bench.name in results:
            parts += bench.markdown(results, figures)
    parts += fig_md(figures, "routing")
    return "\n".join(parts).rstrip() + "\n"


# ------------------------------------------------------------------------------------------ figures


def eval_figures(results: dict, out: str | Path, table: Optional[dict] = None) -> dict[str, Path]:
    """PNG per benchmark (its own :meth:`~.base.Benchmark.figures`) and the routing shares (routing.png:
    from Table 1 (``table``, :func:`~.table.paper_table`) per benchmark column and category, one bar per
    persona and one for the abstained share, when the gate's records hold personas or abstentions; else
    one bar per category from each benchmark's results)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figs: dict[str, Path] = {}
    for bench in REGISTRY.values():
        if bench.name in results:
            figs.update(bench.figures(results, out))
    split = table_routing(table) if table else None
    routing = routing_rows(results)
    if split:
        labels, series = split
        figs["routing"] = grouped_bars(
            out / "routing.png",
            "Share routed by benchmark and category (prism: recorded decisions)",
            labels,
            series,
            "share (%)",
            scale=100,
            ylim=(0, 100),
        )
    elif routing:
        labels = [r[0] for r in routing]
        figs["routing"] = grouped_bars(
            out / "routing.png",
            "Share routed to the LoRA by category (prism)",
            labels,
            {"prism": [r[1] for r in routing]},
            "routed (%)",
            scale=100,
            ylim=(0, 100),
        )
    return figs


def table_routing(table: dict) -> Optional[tuple[list[str], dict]]:
    """(labels, ``{series: [CI per label]}``) of routing.png from Table 1: a label per benchmark column
    (then ``column: category``), series ``routed`` (any adapter), one per persona (K-way) and
    ``abstained`` (a gate that can abstain); ``None`` when the table has neither personas nor abstentions
    (routing.png is then drawn from the results, as before)."""
    names = list(table.get("personas") or {})
    held = bool(table.get("abstained"))
    if not table.get("routing") or not (names or held):
        return None
    label = {c["key"]: c["label"] for c in table["columns"]}
    rows: list[tuple[str, dict]] = []
    for key in table["routing"]:
        by = {"routed": table["routing"][key]}
        by.update({f"to {n}": table["personas"][n].get(key) for n in names})
        if held:
            by["abstained"] = table["abstained"].get(key)
        rows.append((label.get(key, key), by))
    for r in table.get("categories", []):
        if r["category"] == label.get(r["column"], r["column"]):
            continue
        by = {"routed": r["routed"]}
        by.update({f"to {n}": (r.get("personas") or {}).get(n) for n in names})
        if held:
            by["abstained"] = r.get("abstained")
        rows.append((f"{label.get(r['column'], r['column'])}: {r['category']}", by))
    series_names = ["routed"] + [f"to {n}" for n in names] + (["abstained"] if held else [])
    return [lab for lab, _ in rows], {s: [by.get(s) for _, by in rows] for s in series_names}


def routing_rows(results: dict, system: str = "prism") -> list[tuple[str, dict]]:
    """(category label, routed-share CI) over every benchmark, for one gated system."""
    if system not in results.get("systems", []):
        return []
    rows = []
    for bench in REGISTRY.values():
        rows += bench.routing_rows(results.get(bench.name, {}).get(system) or {})
    return rows


def heatmap(
    path: str | Path, matrix: dict, rows: Sequence[str], cols: Sequence[str], title: str, cbar: str = "lift vs base"
) -> Path:
    """``matrix[row][col]`` (numbers or None) as an annotated diverging heatmap centred on 0
    (blue = positive lift, red = negative)."""
    plt = pyplot()
    vals = [[matrix.get(r, {}).get(c) for c in cols] for r in rows]
    finite = [abs(v) for row in vals for v in row if ok(v)]
    vmax = max(finite) if finite and max(finite) > 0 else 1.0
    data = [[v if ok(v) else float("nan") for v in row] for row in vals]
    fig, ax = plt.subplots(figsize=(1.0 * len(cols) + 2.5, 0.6 * len(rows) + 1.8))
    im = ax.imshow(data, cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows)
    for i, row in enumerate(vals):
        for j, v in enumerate(row):
            dark = ok(v) and abs(v) > 0.6 * vmax
            ax.text(
                j,
                i,
                f"{v:+.2f}" if ok(v) else "n/a",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if dark else "black",
            )
    ax.set_xlabel("MT-Bench category")
    ax.set_ylabel("persona domain")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=cbar)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def scatter(path: str | Path, points: Sequence[tuple[str, float, float]], xlabel: str, ylabel: str, title: str) -> Path:
    """Labelled scatter of (label, x, y) with a least-squares line when it is defined."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    xs = [p[1] for p in points]
    ys = [p[2] for p in points]
    ax.scatter(xs, ys, s=40, edgecolor="black", linewidth=0.5)
    for lab, x, y in points:
        ax.annotate(lab, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if len(points) >= 2 and len(set(xs)) > 1:
        n = len(xs)
        mx, my = sum(xs) / n, sum(ys) / n
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        lo, hi = min(xs), max(xs)
        ax.plot([lo, hi], [my + b * (lo - mx), my + b * (hi - mx)], color="gray", linestyle="--", linewidth=0.8)
    ax.axhline(0, color="lightgray", linewidth=0.6)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
