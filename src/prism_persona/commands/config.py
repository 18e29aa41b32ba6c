"""`prism config`: show every setting (run, generate, chat, serve, ...) with its default and help, or a preset resolved."""

from __future__ import annotations

from .common import add_common


def add_parser(sub) -> None:
    p = sub.add_parser(
        "config",
        help="show all settings, their defaults and help",
        description="Print every setting (dotted key, default, help), or the resolved config as JSON.",
    )
    p.add_argument("--show", action="store_true", help="print the resolved config as JSON (a starting config file)")
    p.add_argument("--preset", help="resolve this preset")
    p.add_argument("--config", help="resolve this config file on top of the preset")
    add_common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import config as C
    from ..command_settings import COMMAND_SETTINGS
    from ..options import describe_flags

    if args.show:
        print(C.dump(C.resolve(preset=args.preset or "default", file=args.config)))
        return 0
    print("prism run / bootstrap / gate / distill (config-file keys; --set KEY=VALUE)")
    for key, default, help_ in C.describe():
        print(f"  {key:32s} {str(default):24s} {help_}")
    from ..evals.settings import EvalConfig  # standard library only, like config.py

    for command, cls in {**COMMAND_SETTINGS, "eval / study": EvalConfig}.items():
        print(f"\nprism {command} (flags)")
        for flag, default, help_ in describe_flags(cls):
            print(f"  {flag:32s} {str(default):24s} {help_}")
    return 0
