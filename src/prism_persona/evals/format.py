"""The shared pieces of every report: CI text, Markdown tables, grouped bar charts (matplotlib, Agg backend).

Every number is shown with its bootstrap 95% CI and sample count. Standard library only until a figure
is drawn (matplotlib is imported then).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from ..text import md_table as md_table  # the one copy; evals modules import it from here


def ok(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def fmt_ci(ci: Optional[dict], pct: bool = False, digits: int = 2) -> str:
    """``"0.40 [0.10, 0.70] (n=10)"``, or ``"-"`` for a missing / empty value; ``pct`` shows percent."""
    if not ci or not ci.get("n") or not ok(ci.get("mean")):
        return "-"
    k, d = (100.0, 1) if pct else (1.0, digits)
    unit = "%" if pct else ""
    return f"{ci['mean'] * k:.{d}f}{unit} [{ci['lo'] * k:.{d}f}, {ci['hi'] * k:.{d}f}] (n={ci['n']})"


def fmt_num(x, digits: int = 2) -> str:
    return f"{x:+.{digits}f}" if ok(x) else "-"


def present(section: dict, systems) -> list:
    """The systems a benchmark section has (FastChat answer systems exist for MT-Bench only)."""
    return [s for s in systems if s in section]


def routing_table(section: dict, systems, label: str, note: str = "") -> list[str]:
    """The routed share of each gated system by category; for a K-way artifact (``routing_personas``) the
    share routed to any adapter, then one line per persona. ``note``: what is counted (e.g. MT-Bench's
    first turn)."""
    rows = []
    named = False
    for s in systems:
        rt = section[s].get("routing")
        if rt:
            rows.append([s] + [f"{k}: {fmt_ci(v, pct=True)}" for k, v in rt.items()])
            for name, by in (section[s].get("routing_personas") or {}).items():
                named = True
                rows.append([f"{s}, to {name}"] + [f"{k}: {fmt_ci(v, pct=True)}" for k, v in by.items()])
    if not rows:
        return []
    what = "an adapter (any persona, then each persona)" if named else "the LoRA"
    how = f"{label}, by category" + (f"; {note}" if note else "")
    return [f"Routed to {what} ({how}):", ""] + [f"- {r[0]}: " + "; ".join(r[1:]) for r in rows] + [""]


def fig_md(figures: dict, name: str) -> list[str]:
    if name in figures:
        return [f"![{name}]({Path(figures[name]).name})", ""]
    return []


# ------------------------------------------------------------------------------------------ figures


def pyplot():
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
    plt = pyplot()
    names = list(series)
    many = len(groups) > 5
    width_in = min(14.0, max(6.0, 0.28 * len(groups) * max(1, len(names)) + 2.5))
    fig, ax = plt.subplots(figsize=(width_in, 4.8 if many else 4.2))
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        xs, ys, errs = [], [], [[], []]
        for i, ci in enumerate(series[name]):
            if not ci or not ci.get("n") or not ok(ci.get("mean")):
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
    # right of the axes, so it never hides a bar nor the (rotated) category labels below them
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)
