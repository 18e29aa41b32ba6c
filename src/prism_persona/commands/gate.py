"""`prism gate`: train the routing gate of a bootstrapped run (one stage of `prism run`)."""

from __future__ import annotations

import argparse

from .common import add_common

DESCRIPTION = """\
Train the gate on RUN's labelled queries: an MLP on the hidden state of the last prompt token after
decoder layer 0, predicting whether the persona answer won. Writes RUN/gate/ (gate.safetensors,
gate_config.json with threshold and metrics) and assembles RUN/prism when distillation is done too."""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "gate",
        help="train the routing gate of a run (stage of `prism run`)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", required=True, help="run directory made by `prism bootstrap` / `prism run`")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set gate.calibrate=rate:0.3 (repeatable)",
    )
    p.add_argument("--redo", action="store_true", help="train the gate again with the current settings")
    add_common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..train.pipeline import run_config, train_stages
    from .common import overrides_from_args
    from .run import print_result

    cfg = run_config(args.run, overrides_from_args(args))
    if args.redo:
        from ..train.pipeline import redo

        redo(args.run, "gate")
    print_result(train_stages(cfg, stages=("gate",)))
    return 0
