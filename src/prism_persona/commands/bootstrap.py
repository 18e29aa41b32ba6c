"""`prism bootstrap`: personas -> queries -> answers -> self-verification, resumable, in one run dir."""

from __future__ import annotations

import argparse

from .common import add_common, add_pipeline_options, config_from_args, resume_from_saved_config

DESCRIPTION = """\
From a list of domain names, the model writes an expert persona per domain, writes queries while
playing each persona, answers every query with and without the persona, and judges each pair itself
in both orders (the persona answer wins only if it wins both). Writes RUN/personas.jsonl,
queries.jsonl, answers.jsonl, verdicts.jsonl, summary.json and summary.md.

Rerun the same command to resume after an interruption; `prism bootstrap --out RUN` alone resumes
with the settings saved in RUN/config.json."""

EXAMPLES = """examples:
  prism bootstrap --domains "writing,coding,safety" --preset tiny --out runs/demo
  prism bootstrap --model Qwen/Qwen2.5-7B-Instruct --domains writing,coding --queries-per-persona 50 --out runs/qwen
  prism bootstrap --domains law --persona-file law=lawyer.txt --judge my_judges:prefer_cited --out runs/law
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bootstrap",
        help="write personas, queries and answers; self-judge them (resumable)",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_pipeline_options(p, check=False)
    add_common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    resume_from_saved_config(args)
    cfg = config_from_args(args)
    from ..bootstrap.summary import format_summary
    from ..train.pipeline import run_bootstrap

    summary = run_bootstrap(cfg, redo_stage=args.redo)
    print(format_summary(summary), end="")
    print(f"\nwrote {summary['run']}/verdicts.jsonl, summary.json and summary.md")
    return 0
