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
  prism check --prism runs/style/prism --queries src/prism_persona/kits/style/heldout.jsonl --judge prism_persona.kits.style:judge
"""


def add_parser(sub) -> None:
    from ..command_settings import CheckSettings
    from ..options import add_flags

    p = sub.add_parser(
        "check",
        help="measure an artifact on held-out queries (routing, transfer, base identity)",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_flags(p, CheckSettings)
    p.add_argument(
        "--persona-file",
        action="append",
        default=[],
        metavar="DOMAIN=PATH",
        help="persona for the persona-prompt system (default: the personas of the artifact's run)",
    )
    add_common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..bootstrap.common import persona_files_from_flags
    from ..command_settings import CheckSettings
    from ..options import settings_from_args
    from ..train.check import fmt, loops_vs_base_text, run_check

    settings = settings_from_args(CheckSettings, args)
    files = persona_files_from_flags(args.persona_file)
    rep = run_check(
        settings.prism,
        settings.check_config(),
        settings.judge_config(),
        settings.out or None,
        persona_files=files,
        device=settings.device,
        dtype=settings.dtype,
        batch_size=settings.batch_size,
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
