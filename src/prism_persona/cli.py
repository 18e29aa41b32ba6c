"""The ``prism`` command: one subcommand per stage, thin over the library.

Each subcommand lives in ``prism_persona.commands.<name>`` and defines ``add_parser(subparsers)``
and ``run(args) -> int``. Those modules import nothing heavy at the top (the standard library and
PRISM's light modules: settings, errors, the engine registry), so ``prism --help`` answers instantly;
torch and transformers load inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from . import __version__

COMMANDS = [
    "bootstrap",  # personas -> queries -> answers -> verdicts
    "run",  # bootstrap + gate + distill -> RUN/prism artifact
    "gate",
    "distill",
    "generate",
    "chat",
    "eval",
    "study",
    "serve",
    "export",
    "check",  # the method on held-out queries
    "config",
]

EPILOG = """examples:
  prism run --preset tiny --domains "writing,coding,safety" --out runs/demo
  prism bootstrap --model Qwen/Qwen2.5-7B-Instruct --domains writing,coding --queries-per-persona 50 --out runs/qwen
  prism chat --prism runs/demo/prism
  prism generate --prism runs/demo/prism --input prompts.jsonl --output out.jsonl
"""


class OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors as one line (``prism run: error: argument --seed: invalid int
    value: '1e20'``) and exit code 2, like every other user mistake; ``-h`` still shows the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="prism",
        description="PRISM: self-distil expert-persona behaviour into a gated LoRA, from a list of domain names.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"prism-persona {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    load_plugins()  # before the commands read the registries (--engine, --redo choices)
    for name in COMMANDS:
        importlib.import_module(f".commands.{name}", __package__).add_parser(sub)
    return parser


def load_plugins() -> None:
    """The engines and stages of installed packages (their ``prism_persona.engines`` /
    ``prism_persona.stages`` entry points, :mod:`prism_persona.plugins`)."""
    from . import engines, stages

    engines.load_plugins()
    stages.load_plugins()


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="prism: %(message)s", stream=sys.stderr, force=True)
    for noisy in ("httpx", "urllib3", "filelock", "transformers", "accelerate", "peft", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING if not verbose else logging.INFO)
    if quiet:
        os.environ["PRISM_QUIET"] = "1"


def quiet_third_party() -> None:
    """Silence transformers' own progress bars and advice; PRISM shows its own progress."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    from .errors import PrismError

    try:
        parser = build_parser()
    except PrismError as exc:  # a plug-in that fails to import
        print(f"prism: error: {exc}", file=sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # a usage error (one line, above), --help or --version
        return int(exc.code or 0)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    setup_logging(getattr(args, "quiet", False), getattr(args, "verbose", False))
    try:
        quiet_third_party()
        return int(args.func(args) or 0)
    except PrismError as exc:
        print(f"prism {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nprism {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
