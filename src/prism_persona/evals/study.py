"""The persona-effect study on any model, built on the eval machinery and its cache.

Conditions (all judged like `prism eval`):

* **lift matrix**: each domain's persona (``persona@DOMAIN``) on every MT-Bench category, minus base;
* **expert vs random**: the matched persona vs a persona from an unrelated domain (``random``);
* **length**: min / short / long matched persona; **placement**: system message vs user message;
* the MMLU and safety effect of each condition;
* with a PRISM artifact: the share routed to the LoRA per MT-Bench category against the matched
  persona's effect on that category (Pearson r and Spearman rho).

Every lift is a paired difference over the same items with a bootstrap 95% CI.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from ..stats import bootstrap_ci, pearson, spearman
from .benchmarks import REGISTRY
from .evaluate import Benchmarks, evaluate
from .format import fmt_ci, md_table, ok, pyplot
from .report import eval_markdown, heatmap, scatter
from .runner import EvalRunner
from .systems import SystemSpec

log = logging.getLogger(__name__)

CONDITIONS = (
    # label, spec
    ("expert", SystemSpec("persona")),
    ("random", SystemSpec("random")),
    ("min", SystemSpec("persona", length="min")),
    ("long", SystemSpec("persona", length="long")),
    ("user", SystemSpec("persona", placement="user")),
)
"""Study conditions besides base; 'expert' doubles as the short / system-placement condition."""

GROUPS = {"length": ("min", "expert", "long"), "placement": ("expert", "user"), "expertise": ("expert", "random")}
LABELS = {
    "expert": "expert (short, system)",
    "min": "min",
    "long": "long",
    "user": "user placement",
    "random": "random persona",
}


def study_domains(runner: EvalRunner, bench: Benchmarks, only: Optional[Sequence[str]] = None) -> list[str]:
    """Persona domains for the lift matrix: the loaded personas, else a generic one per MT-Bench category.

    ``only`` keeps just those rows (domain names, or MT-Bench category names for the generic personas).
    """
    from ..errors import PrismError

    if runner.book.personas:
        doms = list(runner.book.personas)
    else:
        doms = [f"generic:{c}" for c in sorted({it.category for it in bench.mtbench})]
    if only:
        keep = [d for d in doms if d in only or _short(d) in only]
        missing = sorted(set(only) - {d for d in doms} - {_short(d) for d in doms})
        if missing:
            raise PrismError(
                f"--matrix-domains: no persona for {', '.join(missing)} (have: {', '.join(_short(d) for d in doms)})"
            )
        doms = keep
    return doms


def paired_lift(per: dict, system: str, base: str = "base", items: Optional[Sequence[str]] = None, **kw) -> dict:
    """CI of mean(system - base) over items both have (``per[system][item_id]``)."""
    a, b = per.get(system, {}), per.get(base, {})
    keys = [k for k in (items if items is not None else a) if k in a and k in b]
    return bootstrap_ci([a[k] - b[k] for k in keys], **kw)


def run_study(
    runner: EvalRunner,
    bench: Benchmarks,
    with_prism: bool = False,
    pairwise: bool = False,
    matrix_domains: Optional[Sequence[str]] = None,
) -> dict:
    """Evaluate every study condition (cached) and compute lifts, matrix and routing correlations."""
    kw = {"n_resamples": runner.s.resamples, "seed": runner.s.seed}
    specs = [SystemSpec("base")] + [s for _, s in CONDITIONS] + ([SystemSpec("prism")] if with_prism else [])
    results, per = evaluate(runner, specs, bench, pairwise=pairwise)
    label_of = {s.name: lab for lab, s in CONDITIONS}
    study: dict = {"results": results, "conditions": {lab: s.name for lab, s in CONDITIONS}}

    effects: dict = {}
    for bench_name, values in _benchmark_values(per, bench, kw).items():
        effects[bench_name] = {
            label_of[s.name]: {
                "value": values["value"](s.name),
                "lift": paired_lift(per[values["key"]], s.name, items=values["items"], **kw),
            }
            for _, s in CONDITIONS
        }
        effects[bench_name]["base"] = {"value": values["value"]("base")}
    study["effects"] = effects

    if bench.mtbench:
        domains = study_domains(runner, bench, matrix_domains)
        mspecs = [SystemSpec("persona", domain=d) for d in domains]
        mres, mper = evaluate(runner, [SystemSpec("base")] + mspecs, Benchmarks(mtbench=bench.mtbench), pairwise=False)
        cats = sorted({it.category for it in bench.mtbench})
        by_cat = {c: [it.item_id for it in bench.mtbench if it.category == c] for c in cats}
        matrix = {}
        for d, s in zip(domains, mspecs):
            matrix[_short(d)] = {c: paired_lift(mper["mtbench"], s.name, items=by_cat[c], **kw) for c in cats}
        study["matrix"] = {
            "rows": [_short(d) for d in domains],
            "cols": cats,
            "lift": matrix,
            "matched": {c: runner.book.domain_for(c) or f"generic:{c}" for c in cats},
        }
        if with_prism:
            study["routing_vs_effect"] = _routing_vs_effect(results, per, by_cat, kw)
    study["work"] = results.get("work")
    return study


def _short(domain: str) -> str:
    return domain.split(":", 1)[1] if domain.startswith("generic:") else domain


def _benchmark_values(per: dict, bench: Benchmarks, kw: dict) -> dict:
    """Per benchmark member: the per-item table, the item ids, and a function system -> CI of the value."""
    out = {}
    for benchmark, items in bench:
        for member, ids in benchmark.study_items(items).items():
            out[benchmark.study_label(member)] = {
                "key": benchmark.name,
                "items": ids,
                "value": lambda s, t=benchmark.name, ids=ids: bootstrap_ci(
                    list(per[t][s].values()) if ids is None else [per[t][s][i] for i in ids], **kw
                ),
            }
    return out


def _percent(label: str) -> bool:
    """Whether a study row (a benchmark member's study label) is a share, shown in percent."""
    return any(b.percent and label == b.study_label(m) for b in REGISTRY.values() for m in b.members)


def _routing_vs_effect(results: dict, per: dict, by_cat: dict, kw: dict) -> dict:
    """Per MT-Bench category: % routed by prism and the matched persona's lift; Pearson and Spearman."""
    routing = results["mtbench"].get("prism", {}).get("routing", {})
    points = []
    for c, ids in by_cat.items():
        rt = routing.get(c)
        lift = paired_lift(per["mtbench"], "persona", items=ids, **kw)
        if rt and rt.get("n") and lift.get("n"):
            points.append({"category": c, "routed": rt["mean"], "effect": lift["mean"], "n": lift["n"]})
    xs = [p["routed"] for p in points]
    ys = [p["effect"] for p in points]
    return {
        "points": points,
        "pearson": pearson(xs, ys) if len(points) >= 2 else None,
        "spearman": spearman(xs, ys) if len(points) >= 2 else None,
    }


# ------------------------------------------------------------------------------------------ output


def study_figures(study: dict, out: str | Path) -> dict[str, Path]:
    """heatmap.png (lift matrix), effects.png (lift by condition per benchmark), routing_vs_effect.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figs: dict[str, Path] = {}
    m = study.get("matrix")
    if m:
        values = {
            r: {c: (m["lift"][r][c]["mean"] if m["lift"][r][c]["n"] else None) for c in m["cols"]} for r in m["rows"]
        }
        figs["heatmap"] = heatmap(
            out / "heatmap.png", values, m["rows"], m["cols"], "Persona lift on MT-Bench judge score (persona - base)"
        )
    if study.get("effects"):
        figs["effects"] = effect_bars(out / "effects.png", study["effects"])
    rv = study.get("routing_vs_effect")
    if rv and rv["points"]:
        title = f"Routing vs persona effect (Pearson r = {_fmt(rv['pearson'])}, Spearman rho = {_fmt(rv['spearman'])})"
        figs["routing_vs_effect"] = scatter(
            out / "routing_vs_effect.png",
            [(p["category"], 100 * p["routed"], p["effect"]) for p in rv["points"]],
            "% routed to the LoRA (prism)",
            "matched persona lift (MT-Bench score)",
            title,
        )
    return figs


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:+.2f}"


def effect_bars(path: str | Path, effects: dict) -> Path:
    """One panel per benchmark: lift vs base (95% CI) of each condition, grouped length / placement / expertise."""
    plt = pyplot()
    benches = list(effects)
    order = ["min", "expert", "long", "user", "random"]
    colors = {"min": "#9ecae1", "expert": "#3182bd", "long": "#08519c", "user": "#fd8d3c", "random": "#969696"}
    fig, axes = plt.subplots(1, len(benches), figsize=(3.2 * len(benches) + 0.5, 3.8), squeeze=False)
    for ax, b in zip(axes[0], benches):
        pct = _percent(b)
        k = 100.0 if pct else 1.0
        for i, c in enumerate(order):
            lift = effects[b].get(c, {}).get("lift")
            if not lift or not lift.get("n") or not ok(lift.get("mean")):
                continue
            ax.bar(
                i,
                lift["mean"] * k,
                color=colors[c],
                edgecolor="black",
                linewidth=0.4,
                yerr=[[max(0.0, (lift["mean"] - lift["lo"]) * k)], [max(0.0, (lift["hi"] - lift["mean"]) * k)]],
                capsize=3,
            )
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels(["min", "short", "long", "user", "random"], rotation=30)
        ax.set_title(b, fontsize=9)
        ax.set_ylabel("lift vs base" + (" (percentage points)" if pct else " (score)"), fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Persona effect by length (min/short/long), placement (user) and expertise (random)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def study_markdown(study: dict, figs: dict, notes: Sequence[str] = ()) -> str:
    """The study report: effects table, lift matrix, routing correlation, figures, then the eval tables."""
    parts = ["# Persona-effect study", ""] + [f"- {n}" for n in notes] + [""]
    conds = {lab: s for lab, s in study["conditions"].items()}
    parts.append(
        "Conditions: "
        + "; ".join(f"**{LABELS.get(k, k)}** = `{v}`" for k, v in conds.items())
        + ". Lifts are paired differences vs base on the same items, with bootstrap 95% CIs."
    )
    parts.append("")
    if study.get("effects"):
        parts += ["## Effect of each condition (lift vs base)", ""]
        order = ["expert", "random", "min", "long", "user"]
        rows = []
        for b, e in study["effects"].items():
            pct = _percent(b)
            rows.append([b, fmt_ci(e["base"]["value"], pct=pct)] + [fmt_ci(e[c]["lift"], pct=pct) for c in order])
        parts += [md_table(["benchmark", "base"] + [LABELS[c] for c in order], rows), ""]
        if "effects" in figs:
            parts += [f"![effects]({Path(figs['effects']).name})", ""]
    m = study.get("matrix")
    if m:
        parts += [
            "## Lift matrix: each domain's persona on each MT-Bench category",
            "",
            "Rows: persona domain; columns: MT-Bench category; cells: mean judge score with the persona "
            "minus without (paired, 95% CI).",
            "",
        ]
        rows = [[r] + [fmt_ci(m["lift"][r][c]) for c in m["cols"]] for r in m["rows"]]
        parts += [md_table(["persona \\ category"] + m["cols"], rows), ""]
        parts.append(
            "Matched persona per category (generic: = built-in generic expert persona): "
            + ", ".join(f"{c} -> {d}" for c, d in m["matched"].items())
        )
        parts.append("")
        if "heatmap" in figs:
            parts += [f"![heatmap]({Path(figs['heatmap']).name})", ""]
    rv = study.get("routing_vs_effect")
    if rv:
        parts += ["## Routing vs persona effect (MT-Bench categories)", ""]
        rows = [[p["category"], f"{100 * p['routed']:.1f}%", f"{p['effect']:+.2f}", p["n"]] for p in rv["points"]]
        parts += [
            md_table(["category", "% routed", "matched persona lift", "n"], rows),
            "",
            f"Pearson r = {_fmt(rv['pearson'])}, Spearman rho = {_fmt(rv['spearman'])} "
            f"over {len(rv['points'])} categories.",
            "",
        ]
        if "routing_vs_effect" in figs:
            parts += [f"![routing_vs_effect]({Path(figs['routing_vs_effect']).name})", ""]
    body = eval_markdown(study["results"], study.get("eval_figures", {}), title="All conditions")
    body = body.replace("# All conditions", "## All conditions (eval tables)", 1).replace("\n## ", "\n### ")
    parts += ["", body]
    return "\n".join(parts).rstrip() + "\n"
