"""`prism study`: the persona-effect study (lift matrix, expert vs random, length, placement, routing)."""

from __future__ import annotations

from .common import add_common

EXAMPLES = """examples:
  prism study --limit 16 --out runs/study
  prism study --persona-json personas.json --mmlu data/mmlu --limit 40 --out runs/study
  prism study --prism runs/demo/prism --out runs/demo/study
  prism study --engine vllm --limit 16 --out runs/study-vllm
"""


def add_parser(sub) -> None:
    import argparse

    from ..evals.build import add_eval_options

    p = sub.add_parser(
        "study",
        help="persona-effect study: lift matrix, length, placement, expert vs random",
        description="Measure how expert personas change a model: each domain's persona on every "
        "MT-Bench category, expert vs random persona, min/short/long, system vs user "
        "placement, and their MMLU and safety effects; with --prism, routing vs effect. "
        "Writes study.json, study.md and figures to --out (cached and resumable).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="runs/study", help="output directory (default runs/study)")
    p.add_argument(
        "--pairwise", action="store_true", help="also judge pairwise win rates vs base (2 judge calls per item)"
    )
    p.add_argument(
        "--matrix-domains",
        help="comma list: only these persona domains as lift-matrix rows "
        "(default all; without personas, MT-Bench category names)",
    )
    add_eval_options(p)
    add_common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..evals.build import build_runner, eval_config, load_benchmarks, parse_benchmarks
    from ..evals.report import eval_figures
    from ..evals.study import run_study, study_figures, study_markdown

    cfg = eval_config(args)
    names = parse_benchmarks(cfg.benchmarks)
    bench = load_benchmarks(cfg, names)
    runner = build_runner(cfg, args.out, args.quiet)
    rows = [d.strip() for d in (args.matrix_domains or "").split(",") if d.strip()] or None
    try:
        study = run_study(runner, bench, with_prism=bool(cfg.prism), pairwise=args.pairwise, matrix_domains=rows)
    finally:
        runner.provider.close()  # --engine vllm: stop the server before the figures
    runner.run.write_json("study.json", study)
    figs = study_figures(study, runner.run.root)
    study["eval_figures"] = eval_figures(study["results"], runner.run.root)
    notes = [f"model: {runner.provider.identity('base')}"] + ([f"prism artifact: {cfg.prism}"] if cfg.prism else [])
    md = study_markdown(study, figs, notes)
    runner.run.path("study.md").write_text(md, encoding="utf-8")
    print(md)
    print(f"wrote {runner.run.root}/study.json, study.md and {len(figs) + len(study['eval_figures'])} figures")
    return 0
