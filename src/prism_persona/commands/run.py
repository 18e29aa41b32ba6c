"""`prism run`: bootstrap + gate + distill -> the PRISM artifact in RUN/prism (resumable)."""

from __future__ import annotations

import argparse

from .common import add_common, add_pipeline_options, config_from_args, resume_from_saved_config

DESCRIPTION = """\
The whole pipeline in one run directory: the model writes expert personas for your domains, queries
and answers with and without each persona, judges them itself (bootstrap); a gate learns from the
layer-0 state of each query whether the persona helped (gate); a LoRA learns the persona behaviour
without the persona in the prompt (distill). The result, RUN/prism, is one model that routes every
query itself inside the prefill: `prism chat --prism RUN/prism`.

Rerun the same command to resume; finished stages are skipped. `prism run --out RUN` alone resumes
with the settings saved in RUN/config.json."""

EXAMPLES = """examples:
  prism run --preset tiny --domains "writing,coding,safety" --out runs/demo
  prism run --model Qwen/Qwen2.5-7B-Instruct --domains writing,coding,law --out runs/qwen
  prism run --out runs/demo          # resume
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "run",
        help="bootstrap + gate + distill -> RUN/prism (resumable)",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_pipeline_options(p)
    add_common(p)
    p.set_defaults(func=run)


def print_result(res: dict) -> None:
    from ..bootstrap.summary import fmt_cell

    rep = res["report"]
    if rep is None:  # a non-zero rank of data-parallel distillation
        return
    g, d = rep["gate"], rep["distill"]
    held = (g.get("metrics") or {}).get("heldout") or (g.get("metrics") or {}).get("train") or {}
    t = rep["data"]["total"]
    print(f"data: {t['queries']} labelled queries, persona won {t['persona_won']}")
    if g.get("threshold") is not None:
        print(
            f"gate: threshold {g['threshold']:.3f} ({g['threshold_method']}); held-out accuracy "
            f"{fmt_cell(held.get('accuracy'))}, balanced {fmt_cell(held.get('balanced_accuracy'))}, AUC {fmt_cell(held.get('auc'))}"
        )
    if d.get("steps") is not None:
        print(
            f"distill: {d['examples']} examples, {d['steps']} steps, loss {fmt_cell(d.get('first_loss'))} -> {fmt_cell(d.get('last_loss'))}"
        )
    chk = rep.get("heldout_check")
    if chk:
        o, gr = chk.get("overall") or {}, chk.get("gate_vs_expected_route") or {}
        print(
            f"held-out check ({chk.get('heldout')}): gate AUC {fmt_cell(gr.get('auc'))}, transfer "
            f"{fmt_cell(o.get('transfer_ratio'))}, base identity {fmt_cell(o.get('base_identity'))} of "
            f"{o.get('unrouted')} unrouted; details in {res['run'].path('check') / 'check.md'}"
        )
    print(f"report: {res['run'].path('training_report.md')}")
    if res["artifact"]:
        art = res["artifact"]
        print(f"\nPRISM model: {art}")
        print(f"  chat:     prism chat --prism {art}")
        print(f"  generate: prism generate --prism {art} --input prompts.jsonl --output out.jsonl")


def run(args) -> int:
    resume_from_saved_config(args)
    cfg = config_from_args(args)
    if args.redo:
        from ..train.pipeline import redo

        redo(cfg.out, args.redo)

    from ..train.pipeline import run_pipeline

    print_result(run_pipeline(cfg))
    return 0
