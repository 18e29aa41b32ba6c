"""The training report of a run: ``RUN/training_report.json`` and ``RUN/training_report.md``.

Data counts per domain, gate metrics (train and held-out), routing rate per domain on the held-out
split, the distillation loss curve (PNG) and the time each stage took.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional

from ..bootstrap.summary import BLIND_ADVICE, fmt_cell
from ..text import md_table

REPORT_JSON = "training_report.json"
REPORT_MD = "training_report.md"


def data_counts(records: Sequence[dict]) -> dict:
    """{domain: {"queries", "persona_won"}} plus a ``total`` row."""
    out: dict = {}
    for r in records:
        d = out.setdefault(r.get("domain", ""), {"queries": 0, "persona_won": 0})
        d["queries"] += 1
        d["persona_won"] += int(r.get("label", 0))
    total = {
        "queries": sum(v["queries"] for v in out.values()),
        "persona_won": sum(v["persona_won"] for v in out.values()),
    }
    return {"by_domain": dict(sorted(out.items())), "total": total}


def build_report(
    run, records: Sequence[dict], stage_seconds: Optional[dict] = None, stage_memory: Optional[dict] = None
) -> dict:
    """Collect what the stages left in ``run`` into one dict (written by :func:`write_report`)."""
    gate = run.read_json("gate.done.json") or {}
    distill = run.read_json("distill.done.json") or {}
    summary = run.read_json("summary.json") or {}
    seconds = {"bootstrap": summary.get("wall_seconds")}
    previous = (run.read_json(REPORT_JSON) or {}).get("stage_seconds") or {}
    seconds.update({k: v for k, v in previous.items() if v is not None})  # times of earlier invocations
    seconds.update({"gate": gate.get("seconds"), "distill": distill.get("seconds")})
    seconds.update(stage_seconds or {})
    memory = dict((run.read_json(REPORT_JSON) or {}).get("stage_peak_rss_mb") or {})  # earlier invocations
    memory.update({k: v for k, v in (stage_memory or {}).items() if v is not None})
    return {
        "run": str(run.root),
        "data": data_counts(records),
        "gate": {
            k: gate.get(k)
            for k in (
                "threshold",
                "threshold_method",
                "n_train",
                "n_heldout",
                "positives",
                "negatives",
                "metrics",
                "fallbacks",
                "base_examples",
                "calibration",
                "reliability_plot",
                "personas",
                "min_confidence",
                "confusion",
            )
        },
        "routing_by_domain_heldout": gate.get("routing_by_domain", {}),
        "distill": {
            k: distill.get(k)
            for k in ("examples", "steps", "epochs", "loss", "first_loss", "last_loss", "loss_curve", "loss_plot")
        },
        "stage_seconds": seconds,
        "stage_peak_rss_mb": memory,
        "artifact": str(run.path("prism")),
        "heldout_check": _check_summary(run),
        "labels_noise": (summary.get("judge_diagnostics") or {}).get("blind"),
        "data_report": summary.get("data_report"),
        "statement": artifact_statement(summary, gate, distill),
    }


def routed_share(gate: dict) -> Optional[float]:
    """Share of the labelled queries (training and held-out split) the gate routes, or ``None``."""
    n = routed = 0
    for m in ((gate.get("metrics") or {}).get("train"), (gate.get("metrics") or {}).get("heldout")):
        if m and m.get("n") and m.get("routing_rate") is not None:
            n += m["n"]
            routed += m["routing_rate"] * m["n"]
    return routed / n if n else None


def artifact_statement(summary: dict, gate: dict, distill: dict) -> str:
    """One line saying what the artifact does, in plain words (the last line of ``prism run``)."""
    blind = (summary.get("judge_diagnostics") or {}).get("blind")
    wins = (summary.get("total") or {}).get("wins", 0)
    examples, share = distill.get("examples") or 0, routed_share(gate)
    if not examples or not share:
        if blind:
            why = "the judge could not tell the answers apart, so no answer counts as a persona win"
        elif not wins:
            why = "the persona answer never won in both orders, so there was nothing to learn"
        elif not examples:
            why = "no persona win was left to distil"
        else:
            why = "the gate routes none of the training queries"
        return f"The artifact is exactly the base model: {why}."
    text = (
        f"The artifact routes {share:.0%} of the training queries to a LoRA trained on {examples} persona-won answers"
    )
    if blind:
        return (
            text + ", but the judge could not tell the answers apart: the labels are noise, so it learned nothing real."
        )
    return text + "; measure it on held-out queries with `prism check`."


def _check_summary(run) -> Optional[dict]:
    """The parts of ``RUN/check/check.json`` (``--heldout``) the training report shows, or ``None``."""
    rep = run.read_json(os.path.join("check", "check.json"))
    if not isinstance(rep, dict):
        return None
    return {
        "heldout": rep.get("heldout"),
        "judge": rep.get("judge"),
        "overall": rep.get("overall"),
        "gate_vs_expected_route": rep.get("gate_vs_expected_route"),
        "domains": rep.get("domains"),
    }


def format_report(rep: dict) -> str:
    """Markdown rendering of :func:`build_report`'s dict."""
    lines = [
        "# PRISM training report",
        "",
        f"Run: `{rep['run']}`  ",
        f"Artifact: `{rep['artifact']}`",
        "",
        f"**{rep['statement']}**",
        "",
        "## Data",
        "",
    ]
    if rep.get("labels_noise"):
        lines += [
            f"**The labels are noise**: the judge could not tell the answers apart ({rep['labels_noise']}); "
            f"nothing the gate or the adapter learned from them is real. To fix it: {BLIND_ADVICE}.",
            "",
        ]
    t = rep["data"]["total"]
    data_rows = [[dom, c["queries"], c["persona_won"]] for dom, c in rep["data"]["by_domain"].items()]
    lines += [
        md_table(["domain", "queries", "persona won"], [*data_rows, ["**total**", t["queries"], t["persona_won"]]]),
        "",
        "## Gate (in-distribution)",
        "",
        "Measured on a split of the run's own training queries; `--heldout` (or `prism check`) measures "
        "the artifact on queries it never saw.",
        "",
    ]
    g = rep["gate"]
    lines.append(
        f"Threshold {fmt_cell(g.get('threshold'))} ({g.get('threshold_method') or '-'}); "
        f"{fmt_cell(g.get('n_train'))} training rows"
        + (f" (+ {g['base_examples']} base examples, label 0)" if g.get("base_examples") else "")
        + f", {fmt_cell(g.get('n_heldout'))} held out."
    )
    metric_rows = [
        [split, m["n"], *(fmt_cell(m[k]) for k in ("accuracy", "balanced_accuracy", "auc", "routing_rate"))]
        for split, m in (g.get("metrics") or {}).items()
        if m
    ]
    lines += ["", md_table(["split", "n", "accuracy", "balanced accuracy", "AUC", "routing rate"], metric_rows)]
    for fb in g.get("fallbacks") or []:
        lines.append(f"\n> fallback: {fb}")
    routed_rows = [[dom, r["n"], fmt_cell(r["routing_rate"])] for dom, r in rep["routing_by_domain_heldout"].items()]
    lines += [
        "",
        "Routing rate per domain on the held-out split:",
        "",
        md_table(["domain", "n", "routed"], routed_rows),
    ]
    lines += _calibration_lines(g, rep["run"])
    d = rep["distill"]
    lines += [
        "",
        "## Distillation",
        "",
        f"{fmt_cell(d.get('examples'))} examples, {fmt_cell(d.get('steps'))} steps, loss `{d.get('loss')}`: "
        f"first {fmt_cell(d.get('first_loss'))}, last {fmt_cell(d.get('last_loss'))}.",
    ]
    if d.get("loss_plot"):
        rel = os.path.relpath(d["loss_plot"], rep["run"])
        lines += ["", f"![loss curve]({rel})"]
    lines += _check_lines(rep.get("heldout_check"))
    seconds = [[stage, fmt_cell(s)] for stage, s in rep["stage_seconds"].items()]
    lines += ["", "## Time per stage (seconds)", "", md_table(["stage", "seconds"], seconds)]
    if rep.get("stage_peak_rss_mb"):
        lines += ["", "## Peak memory (process RSS in MB, the peak so far at the end of each stage)", ""]
        lines += [
            md_table(["stage", "peak RSS MB"], [[s, fmt_cell(round(m))] for s, m in rep["stage_peak_rss_mb"].items()])
        ]
    return "\n".join(lines) + "\n"


def write_report(
    run, records: Sequence[dict], stage_seconds: Optional[dict] = None, stage_memory: Optional[dict] = None
) -> dict:
    rep = build_report(run, records, stage_seconds, stage_memory)
    run.write_json(REPORT_JSON, rep)
    run.path(REPORT_MD).write_text(format_report(rep), encoding="utf-8")
    return rep


def _calibration_lines(g: dict, root: str) -> list[str]:
    """The gate's calibration (temperature, ECE before/after, reliability plot) and, for a K-way gate,
    its personas and held-out confusion matrix."""
    cal = g.get("calibration") or {}
    lines: list[str] = []
    if cal:
        lines += [
            "",
            f"Calibration ({cal.get('method') or '-'}): temperature {fmt_cell(cal.get('temperature'))}, expected "
            f"calibration error on {fmt_cell(cal.get('n'))} held-out rows {fmt_cell(cal.get('ece_before'))} before, "
            f"{fmt_cell(cal.get('ece_after'))} after (cross-fitted)." + (f" {cal['note']}." if cal.get("note") else ""),
        ]
    if g.get("reliability_plot"):
        lines += ["", f"![reliability]({os.path.relpath(g['reliability_plot'], root)})"]
    conf = g.get("confusion")
    if g.get("personas"):
        lines += [
            "",
            f"Personas: {', '.join(g['personas'])}; abstain below confidence {fmt_cell(g.get('min_confidence'))}.",
        ]
    if conf:
        names = conf["classes"]
        lines += ["", "Held-out confusion (rows: the class that won; columns: the gate's decision):", ""]
        lines += [md_table(["won \\ decided", *names], [[n, *row] for n, row in zip(names, conf["matrix"])])]
    return lines


def _check_lines(chk: Optional[dict]) -> list[str]:
    """The held-out check section (``--heldout``) of the Markdown report."""
    if not chk:
        return []
    o, g = chk.get("overall") or {}, chk.get("gate_vs_expected_route") or {}
    lines = [
        "",
        "## Held-out check",
        "",
        f"Queries `{chk.get('heldout')}`, judge `{chk.get('judge')}` (details: `check/check.md`). "
        f"Gate AUC {fmt_cell(g.get('auc'))}, balanced accuracy {fmt_cell(g.get('balanced_accuracy'))}; "
        f"behaviour transfer {fmt_cell(o.get('transfer_ratio'))}; base identity "
        f"{fmt_cell(o.get('base_identity'))} of {fmt_cell(o.get('unrouted'))} unrouted.",
        "",
    ]
    rows = [
        [dom, b.get("n"), *(fmt_cell(b.get(k)) for k in ("routing_rate", "lora_win_rate", "persona_win_rate"))]
        + [" / ".join(fmt_cell((b.get("loop_rate") or {}).get(s)) for s in ("base", "lora", "persona", "prism"))]
        for dom, b in (chk.get("domains") or {}).items()
    ]
    header = ["domain", "n", "routed", "LoRA wins", "persona wins", "loops base / LoRA / persona / PRISM"]
    lines.append(md_table(header, rows))
    if o.get("loops_vs_base"):
        from .check import loops_vs_base_text

        lines += [
            "",
            "Loops against the base model, same queries (added / removed, paired exact test): "
            + loops_vs_base_text(o["loops_vs_base"])
            + ".",
        ]
    return lines
