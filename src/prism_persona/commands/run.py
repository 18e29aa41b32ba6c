"""`prism run`: bootstrap + gate + distill -> the PRISM artifact in RUN/prism (resumable)."""

from __future__ import annotations

import argparse

from .common import add_common, add_pipeline_options, config_from_args, print_result, resume_from_saved_config

DESCRIPTION = """\
The whole pipeline in one run directory: the model writes expert personas for your domains, queries
and answers with and without each persona, judges them itself (bootstrap); a gate learns from the
layer-0 state of each query whether the persona helped (gate); a LoRA learns the persona behaviour
without the persona in the prompt (distill). The result, RUN/prism, is one model that routes every
query itself inside the prefill: `prism chat --prism RUN/prism`.

Rerun the same command to resume; finished stages are skipped. `prism run --out RUN` alone resumes
with the settings saved in RUN/config.json.

--example safety|style|safety+style runs a kit shipped with the library whose right answer is known
(personas, queries, a rule judge, held-out queries and small sizes filled in) and ends with a table of
what the artifact does on the held-out queries. Precedence, lowest first: defaults < --preset < --example <
--config file < flags and --set."""

EXAMPLES = """examples:
  prism run --example safety --out runs/demo     # a kit with a known answer; ~2 min on 2 idle CPU cores
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


def run(args) -> int:
    resume_from_saved_config(args)
    cfg = config_from_args(args)
    from ..train.pipeline import run_pipeline

    res = run_pipeline(cfg, redo_stage=args.redo)
    print_result(res)
    if cfg.example and res["report"] is not None and (res["run"].path("check") / "answers.jsonl").is_file():
        from ..kits import SUMMARY_FILE, write_summary

        table = write_summary(cfg.example, res["run"].path("check"), cfg.check.queries)
        print(f"\n{table}\n(also in {res['run'].path('check') / SUMMARY_FILE})")
    return 0
