"""`prism check`: the method on held-out queries -- routing, behaviour transfer, base identity."""

from __future__ import annotations

import argparse

from .common import add_common

DESCRIPTION = """\
Measure a PRISM artifact on queries it was never trained on (write them yourself): the gate's routing
rate per domain and how well it separates the queries that should be routed (AUC, balanced accuracy),
the behaviour transfer ratio (judge win rate of the LoRA without the persona against the base model,
over the win rate of the persona prompt against the base model), whether unrouted answers are
identical to the base model's, and the repetition-loop rate of every system.

The held-out file is .jsonl, .json or .csv with `domain` and `query` (optionally `route`: true/false).
Writes OUT/check.json, check.md and check.png (OUT defaults to RUN/check); rerun to resume."""

EXAMPLES = """examples:
  prism check --prism runs/demo/prism --queries heldout.jsonl --rewarded writing
  prism check --prism runs/style/prism --queries examples/style/heldout.jsonl --judge examples/style/judge.py:judge
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "check",
        help="measure an artifact on held-out queries (routing, transfer, base identity)",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--prism", required=True, metavar="ART", help="the artifact directory (RUN/prism)")
    p.add_argument("--queries", required=True, metavar="PATH", help="held-out queries: domain, query [, route]")
    p.add_argument(
        "--rewarded", metavar="D1,D2", help="domains whose queries should be routed (when the file has no 'route')"
    )
    p.add_argument(
        "--judge",
        default="self",
        help="self (the base model), a model id/path, or module:function / path/file.py:function (runs that code)",
    )
    p.add_argument(
        "--judge-mode", default="auto", choices=["auto", "logprob", "text"], help="how a model judge's verdict is read"
    )
    p.add_argument(
        "--persona-file",
        action="append",
        default=[],
        metavar="DOMAIN=PATH",
        help="persona for the persona-prompt system (default: the personas of the artifact's run)",
    )
    p.add_argument("--max-new-tokens", type=int, default=96, help="answer length (greedy decoding)")
    p.add_argument("--out", help="output directory (default: RUN/check beside the artifact)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--batch-size", type=int, help="rows per generation batch (default: the artifact's)")
    add_common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..errors import PrismError
    from ..evals.check import fmt, loops_vs_base_text, run_check

    files = {}
    for item in args.persona_file:
        if "=" not in item:
            raise PrismError(f"--persona-file wants DOMAIN=PATH, got '{item}'")
        dom, path = item.split("=", 1)
        files[dom.strip()] = str(Path(path).expanduser().resolve())
    rewarded = [d.strip() for d in (args.rewarded or "").split(",") if d.strip()]
    rep = run_check(
        args.prism,
        args.queries,
        args.out,
        judge=args.judge,
        rewarded=rewarded,
        persona_files=files,
        max_new_tokens=args.max_new_tokens,
        judge_mode=args.judge_mode,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        quiet=args.quiet,
    )
    o, g = rep["overall"], rep.get("gate_vs_expected_route") or {}
    for name, b in rep["domains"].items():
        print(
            f"{name:>16}: routed {fmt(b['routing_rate'], True):>4} of {b['n']}, LoRA wins {fmt(b['lora_win_rate'], True)}, "
            f"persona wins {fmt(b['persona_win_rate'], True)}, base identity {fmt(b['base_identity'], True)}"
        )
    print(
        f"gate AUC {fmt(g.get('auc'))}, balanced accuracy {fmt(g.get('balanced_accuracy'))}; "
        f"transfer ratio {fmt(o['transfer_ratio'])}; base identity {fmt(o['base_identity'], True)} of {o['unrouted']} unrouted"
    )
    print("loops vs base (added / removed, paired p): " + loops_vs_base_text(o["loops_vs_base"]))
    print(f"wrote {rep['out']}/check.json, check.md and check.png")
    return 0
