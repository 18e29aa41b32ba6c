"""`prism distill`: distil the persona behaviour of a run into a LoRA (one stage of `prism run`)."""

from __future__ import annotations

import argparse

from .common import add_common

DESCRIPTION = """\
Self-distillation on the queries whose persona answer won: the frozen model WITH the persona is the
teacher, the same model + LoRA (decoder layers 1..L-1) WITHOUT the persona is the student, trained
on the persona answers (KL over the teacher's top-k tokens, or CE). Resumable per epoch. Writes
RUN/distill/ (adapter/, checkpoint/, loss.jsonl, loss.png) and assembles RUN/prism when the gate
is trained too."""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "distill",
        help="distil the persona behaviour into a LoRA (stage of `prism run`)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", required=True, help="run directory made by `prism bootstrap` / `prism run`")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set distill.loss=ce (repeatable)",
    )
    p.add_argument("--redo", action="store_true", help="train the LoRA again with the current settings")
    add_common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..train.pipeline import run_config, train_stages
    from .common import overrides_from_args
    from .run import print_result

    cfg = run_config(args.run, overrides_from_args(args))
    if args.redo:
        from ..train.pipeline import redo

        redo(args.run, "distill")
    print_result(train_stages(cfg, stages=("distill",)))
    return 0
