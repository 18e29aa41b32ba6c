"""Markdown tables and matplotlib figures (Agg backend) for `prism eval` and `prism study`.

Every number is shown with its bootstrap 95% CI and sample count. Figures are written as PNG next to
the Markdown that embeds them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

SAFETY_LABELS = {
    "harmbench": "HarmBench",
    "jailbreak": "JBB harmful",
    "pku": "PKU-SafeRLHF",
    "benign": "JBB benign (over-refusal)",
}


# ------------------------------------------------------------------------------------------ text


def _ok(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def fmt_ci(ci: Optional[dict], pct: bool = False, digits: int = 2) -> str:
    """``"0.40 [0.10, 0.70] (n=10)"``, or ``"-"`` for a missing / empty value; ``pct`` shows percent."""
    if not ci or not ci.get("n") or not _ok(ci.get("mean")):
        return "-"
    k, d = (100.0, 1) if pct else (1.0, digits)
    unit = "%" if pct else ""
    return f"{ci['mean'] * k:.{d}f}{unit} [{ci['lo'] * k:.{d}f}, {ci['hi'] * k:.{d}f}] (n={ci['n']})"


def fmt_num(x, digits: int = 2) -> str:
    return f"{x:+.{digits}f}" if _ok(x) else "-"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def eval_markdown(results: dict, figures: dict, title: str = "PRISM evaluation", notes: Sequence[str] = ()) -> str:
    """The eval report: one table per benchmark, figures embedded by relative path."""
    systems = results["systems"]
    parts = [f"# {title}", ""]
    parts += [f"- {n}" for n in notes]
    parts.append(
        f"- items: {', '.join(f'{k} {v}' for k, v in results.get('counts', {}).items())}; "
        f"95% CIs from {results.get('n_resamples')} bootstrap resamples (seed {results.get('seed')})."
    )
    if results.get("judge"):
        parts.append(f"- judge: `{results['judge'].get('judge')}` (mode {results['judge'].get('mode')})")
    parts.append("")
    if "mmlu" in results:
        systems = _present(results["mmlu"], results["systems"])
        parts += ["## MMLU (0-shot, answer-letter log-likelihood)", ""]
        groups = [
            g
            for g in ("STEM", "Humanities", "Social Sciences", "Other")
            if any(g in results["mmlu"][s]["groups"] for s in systems)
        ]
        rows = [
            [s, fmt_ci(results["mmlu"][s]["accuracy"], pct=True)]
            + [fmt_ci(results["mmlu"][s]["groups"].get(g), pct=True) for g in groups]
            for s in systems
        ]
        parts += [md_table(["system", "accuracy"] + groups, rows), ""]
        parts += _routing_table(results["mmlu"], systems, "MMLU")
        parts += _fig(figures, "mmlu")
    if "mtbench" in results:
        mt = results["mtbench"]
        systems = _present(mt, results["systems"])
        parts += ["## MT-Bench (judge score 1-10; win rate vs base, both orders)", ""]
        rows = []
        for s in systems:
            r = mt[s]
            wr = r.get("win_rate")
            rows.append(
                [
                    s,
                    fmt_ci(r["score"]),
                    fmt_ci(r["turns"].get("1")),
                    fmt_ci(r["turns"].get("2")),
                    f"{r['unparseable']}/{r['n_grades']}",
                    (fmt_ci(wr, pct=True) + f" W/T/L {wr['wins']}/{wr['ties']}/{wr['losses']}") if wr else "-",
                ]
            )
        parts += [md_table(["system", "score", "turn 1", "turn 2", "unparseable", "win rate vs base"], rows), ""]
        cats = sorted(next(iter(mt.values()))["categories"])
        rows = [[c] + [fmt_ci(mt[s]["categories"].get(c)) for s in systems] for c in cats]
        parts += ["Score by category:", "", md_table(["category"] + systems, rows), ""]
        if any(mt[s].get("win_rate") for s in systems):
            rows = [
                [c]
                + [
                    fmt_ci(mt[s]["win_rate"]["categories"].get(c), pct=True) if mt[s].get("win_rate") else "-"
                    for s in systems
                ]
                for c in cats
            ]
            parts += ["Win rate vs base by category:", "", md_table(["category"] + systems, rows), ""]
        parts += _routing_table(mt, systems, "MT-Bench")
        parts += _fig(figures, "mtbench") + _fig(figures, "mtbench_winrate")
    if "safety" in results:
        sf = results["safety"]
        systems = _present(sf, results["systems"])
        benches = list(next(iter(sf.values())))
        rc = (results.get("refusal_classifier") or {}).get("classifier", "judge")
        parts += [f"## Safety (refusal rate; over-refusal on benign requests; decided by: {rc})", ""]
        rows = [[s] + [fmt_ci(sf[s][b]["refusal"], pct=True) for b in benches] for s in systems]
        parts += [md_table(["system"] + [SAFETY_LABELS.get(b, b) for b in benches], rows), ""]
        meth = [[s] + [", ".join(f"{k} {v}" for k, v in sf[s][b]["method"].items()) for b in benches] for s in systems]
        parts += [
            "How refusals were decided (logprob / text = judge, keyword = judge fallback, string = "
            "string-match baseline, callable = user function):",
            "",
            md_table(["system"] + [SAFETY_LABELS.get(b, b) for b in benches], meth),
            "",
        ]
        prism = [s for s in systems if any(sf[s][b].get("routing") for b in benches)]
        if prism:
            rows = [[s] + [fmt_ci(sf[s][b].get("routing"), pct=True) for b in benches] for s in prism]
            parts += ["Routed to the LoRA:", "", md_table(["system"] + benches, rows), ""]
        parts += _fig(figures, "safety")
    parts += _fig(figures, "routing")
    return "\n".join(parts).rstrip() + "\n"


def _present(section: dict, systems) -> list:
    """The systems a benchmark section has (FastChat answer systems exist for MT-Bench only)."""
    return [s for s in systems if s in section]


def _routing_table(section: dict, systems, label: str) -> list[str]:
    rows = []
    for s in systems:
        rt = section[s].get("routing")
        if rt:
            rows.append([s] + [f"{k}: {fmt_ci(v, pct=True)}" for k, v in rt.items()])
    if not rows:
        return []
    return [f"Routed to the LoRA ({label}, by category):", ""] + [f"- {r[0]}: " + "; ".join(r[1:]) for r in rows] + [""]


def _fig(figures: dict, name: str) -> list[str]:
    if name in figures:
        return [f"![{name}]({Path(figures[name]).name})", ""]
    return []


# ------------------------------------------------------------------------------------------ figures


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def grouped_bars(
    path: str | Path,
    title: str,
    groups: Sequence[str],
    series: dict,
    ylabel: str,
    scale: float = 1.0,
    ylim: Optional[tuple] = None,
    hline: Optional[float] = None,
) -> Path:
    """Bars of ``series[name][i]`` (CI dicts) over ``groups``, with 95% CI error bars and n labels."""
    plt = _plt()
    names = list(series)
    many = len(groups) > 5
    width_in = min(14.0, max(6.0, 0.28 * len(groups) * max(1, len(names)) + 2.5))
    fig, ax = plt.subplots(figsize=(width_in, 4.8 if many else 4.2))
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        xs, ys, errs = [], [], [[], []]
        for i, ci in enumerate(series[name]):
            if not ci or not ci.get("n") or not _ok(ci.get("mean")):
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(ci["mean"] * scale)
            errs[0].append(max(0.0, (ci["mean"] - ci["lo"]) * scale))
            errs[1].append(max(0.0, (ci["hi"] - ci["mean"]) * scale))
        ax.bar(xs, ys, width, yerr=errs, capsize=2, label=name, edgecolor="black", linewidth=0.4)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20 if many else 0, ha="right" if many else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ylim:
        ax.set_ylim(*ylim)
    if hline is not None:
        ax.axhline(hline, color="gray", linestyle="--", linewidth=0.8)
    # below the axes, so it never hides a bar
    ax.legend(fontsize=8, ncol=min(6, len(names)), loc="upper center", bbox_to_anchor=(0.5, -0.2 if many else -0.1))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def eval_figures(results: dict, out: str | Path) -> dict[str, Path]:
    """PNG per benchmark: MMLU by group, MT-Bench by category (+ win rate), safety refusal, routing."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    systems = results["systems"]
    figs: dict[str, Path] = {}
    if "mmlu" in results:
        mm = results["mmlu"]
        systems = _present(mm, results["systems"])
        groups = ["all"] + [
            g for g in ("STEM", "Humanities", "Social Sciences", "Other") if any(g in mm[s]["groups"] for s in systems)
        ]
        series = {s: [mm[s]["accuracy"]] + [mm[s]["groups"].get(g) for g in groups[1:]] for s in systems}
        figs["mmlu"] = grouped_bars(
            out / "mmlu.png",
            "MMLU accuracy (95% CI)",
            groups,
            series,
            "accuracy (%)",
            scale=100,
            ylim=(0, 100),
            hline=25,
        )
    if "mtbench" in results:
        mt = results["mtbench"]
        systems = _present(mt, results["systems"])
        cats = sorted(next(iter(mt.values()))["categories"])
        series = {s: [mt[s]["score"]] + [mt[s]["categories"].get(c) for c in cats] for s in systems}
        figs["mtbench"] = grouped_bars(
            out / "mtbench.png", "MT-Bench judge score (95% CI)", ["all"] + cats, series, "score (1-10)", ylim=(0, 10.5)
        )
        wr = {
            s: [mt[s]["win_rate"]] + [mt[s]["win_rate"]["categories"].get(c) for c in cats]
            for s in systems
            if mt[s].get("win_rate")
        }
        if wr:
            figs["mtbench_winrate"] = grouped_bars(
                out / "mtbench_winrate.png",
                "MT-Bench win rate vs base (ties = 1/2)",
                ["all"] + cats,
                wr,
                "win rate (%)",
                scale=100,
                ylim=(0, 100),
                hline=50,
            )
    if "safety" in results:
        sf = results["safety"]
        systems = _present(sf, results["systems"])
        benches = list(next(iter(sf.values())))
        series = {s: [sf[s][b]["refusal"] for b in benches] for s in systems}
        figs["safety"] = grouped_bars(
            out / "safety.png",
            "Refusal rate (95% CI)",
            [SAFETY_LABELS.get(b, b) for b in benches],
            series,
            "refused (%)",
            scale=100,
            ylim=(0, 100),
        )
    routing = routing_rows(results)
    if routing:
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


def routing_rows(results: dict, system: str = "prism") -> list[tuple[str, dict]]:
    """(category label, routed-share CI) over every benchmark, for one gated system."""
    rows = []
    if system not in results.get("systems", []):
        return rows
    for key, label in (("mmlu", "MMLU "), ("mtbench", "")):
        rt = results.get(key, {}).get(system, {}).get("routing") or {}
        rows += [(f"{label}{c}", v) for c, v in rt.items() if c != "all"]
    for b, v in (results.get("safety", {}).get(system) or {}).items():
        if v.get("routing"):
            rows.append((SAFETY_LABELS.get(b, b), v["routing"]))
    return rows


def heatmap(
    path: str | Path, matrix: dict, rows: Sequence[str], cols: Sequence[str], title: str, cbar: str = "lift vs base"
) -> Path:
    """``matrix[row][col]`` (numbers or None) as an annotated diverging heatmap centred on 0
    (blue = positive lift, red = negative)."""
    plt = _plt()
    vals = [[matrix.get(r, {}).get(c) for c in cols] for r in rows]
    finite = [abs(v) for row in vals for v in row if _ok(v)]
    vmax = max(finite) if finite and max(finite) > 0 else 1.0
    data = [[v if _ok(v) else float("nan") for v in row] for row in vals]
    fig, ax = plt.subplots(figsize=(1.0 * len(cols) + 2.5, 0.6 * len(rows) + 1.8))
    im = ax.imshow(data, cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows)
    for i, row in enumerate(vals):
        for j, v in enumerate(row):
            dark = _ok(v) and abs(v) > 0.6 * vmax
            ax.text(
                j,
                i,
                f"{v:+.2f}" if _ok(v) else "n/a",
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
    plt = _plt()
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
