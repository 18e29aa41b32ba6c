"""`prism eval`: compare systems (base, persona, lora, prism, oracle) on MMLU, MT-Bench and safety sets."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .common import add_common

if TYPE_CHECKING:  # commands import the standard library only at the top (`prism --help` stays instant)
    from ..evals.runner import EvalRunner
    from ..evals.settings import EvalConfig

EXAMPLES = """examples:
  prism eval --systems base,persona --limit 20 --out runs/eval-base
  prism eval --prism runs/demo/prism --systems base,persona,lora,prism,oracle --mmlu data/mmlu --out runs/demo/eval
  prism eval --benchmarks mtbench --judge Qwen/Qwen2.5-7B-Instruct --answer-tokens 256 --out runs/eval
  prism eval --prism runs/demo/prism --engine vllm --limit 20 --out runs/demo/eval-vllm
  prism eval --engine openai --base-url http://127.0.0.1:8000/v1 --model my-model --systems base,persona
"""


def add_parser(sub) -> None:
    import argparse

    from ..evals.build import add_eval_options

    p = sub.add_parser(
        "eval",
        help="compare systems on MMLU, MT-Bench and safety benchmarks",
        description="Run systems on benchmarks, judge the answers, and write results.json, "
        "report.md and PNG figures to --out. Rerun to resume; responses and "
        "judgments are cached.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--systems",
        help="comma list of base, persona[@DOMAIN][/LENGTH][/PLACEMENT], random, lora, prism, "
        "oracle (default: base,persona; with --prism also lora,prism,oracle)",
    )
    p.add_argument("--out", default="runs/eval", help="output directory (default runs/eval)")
    p.add_argument(
        "--fastchat-answers",
        metavar="PATH",
        action="append",
        help="FastChat model_answer .jsonl file or folder: each model in it becomes a system whose "
        "MT-Bench answers come from the file (graded and compared with base); repeatable",
    )
    add_eval_options(p)
    add_common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import PrismError
    from ..evals.build import build_runner, eval_config, load_benchmarks, parse_benchmarks
    from ..evals.evaluate import evaluate
    from ..evals.report import eval_figures, eval_markdown
    from ..evals.systems import SystemSpec, parse_systems

    cfg = eval_config(args)
    default = "base,persona,lora,prism,oracle" if cfg.prism else "base,persona"
    specs = parse_systems(args.systems or default, cfg.persona_length, cfg.placement)
    if any(s.kind in ("lora", "prism", "oracle") for s in specs) and not cfg.prism:
        raise PrismError("systems lora, prism and oracle need --prism ARTIFACT (a trained RUN/prism directory)")
    names = parse_benchmarks(cfg.benchmarks)
    external = _fastchat_systems(args, names)
    bench = load_benchmarks(cfg, names)
    runner = build_runner(cfg, args.out, args.quiet)
    runner.external_answers = external
    threshold, personas = _gate_info(cfg)
    runner.gate_personas = list(personas)  # a K-way artifact: each benchmark's routing text names them
    specs = specs + [SystemSpec("answers", domain=m) for m in external]
    try:
        results, per_item = evaluate(runner, specs, bench, pairwise=not cfg.no_pairwise)
        if bench.mtbench:
            from ..evals.evaluate import systems_to_run
            from ..evals.fastchat import write_fastchat

            write_fastchat(
                runner.run.root / "fastchat", runner, systems_to_run(specs), bench.mtbench, pairwise=not cfg.no_pairwise
            )
    finally:
        runner.provider.close()  # --engine vllm: the server stops once generation and judging are done
    runner.run.write_json("results.json", results)
    runner.run.write_json("per_item.json", per_item)
    table = _table(runner, results, per_item, bench, threshold, personas)
    figs = eval_figures(results, runner.run.root, table)
    md = eval_markdown(
        results,
        figs,
        notes=[f"model: {runner.provider.identity('base')}"] + ([f"prism artifact: {cfg.prism}"] if cfg.prism else []),
    )
    md += _table_section(table)
    md += _sweep_section(cfg, runner, per_item, bench, threshold)
    runner.run.path("report.md").write_text(md, encoding="utf-8")
    print(md)
    print(f"wrote {runner.run.root}/results.json, report.md and {len(figs)} figures")
    return 0


def _gate_info(cfg: EvalConfig) -> tuple:
    """The artifact's gate threshold and, for a K-way gate, its persona names (``(None, [])`` without --prism)."""
    if not cfg.prism:
        return None, []
    from ..gated.artifact import Artifact

    gate = Artifact.read(cfg.prism).gate()
    return float(gate.threshold), (list(gate.personas) if gate.gate.personas > 1 else [])


def _table(runner: EvalRunner, results, per_item, bench, threshold, personas) -> dict:
    """The paper's Table 1 (written to table1.json when it has a column) from the per-item values."""
    from ..evals.table import paper_table

    table = paper_table(results, per_item, bench, threshold, personas)
    if table["columns"]:
        runner.run.write_json("table1.json", table)
    return table


def _table_section(table: dict) -> str:
    """Table 1's report section."""
    from ..evals.table import table_markdown

    return "\n" + table_markdown(table) if table["columns"] else ""


def _sweep_section(cfg: EvalConfig, runner: EvalRunner, per_item, bench, threshold) -> str:
    """The threshold trade-off and routing-vs-effect (with --prism and base, lora, prism evaluated)."""
    if not cfg.prism or "gate" not in per_item:
        return ""
    from ..evals.sweep import write_sweep

    return "\n" + write_sweep(runner.run, per_item, bench, threshold)[2]


def _fastchat_systems(args, names) -> dict:
    """{model id: {question_id: [answers]}} from --fastchat-answers (read before any model loads)."""
    if not args.fastchat_answers:
        return {}
    from ..errors import PrismError
    from ..evals.base import REGISTRY, owner
    from ..evals.fastchat import read_answers

    takers = [b.name for b in REGISTRY.values() if b.answers_from_files]  # the benchmarks that run them
    if not any(owner(n).answers_from_files for n in names):
        raise PrismError(f"--fastchat-answers holds answers to {' or '.join(takers)}: include it in --benchmarks")
    out: dict = {}
    for path in args.fastchat_answers:
        for model, answers in read_answers(path).items():
            if model in out or model in ("base", "persona", "random", "lora", "prism", "oracle"):
                raise PrismError(f"FastChat answers: model '{model}' ({path}) clashes with another system's name")
            out[model] = answers
    return out
