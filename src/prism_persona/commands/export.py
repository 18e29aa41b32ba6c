"""`prism export`: write the PRISM artifact in a format another server loads (vLLM)."""

from __future__ import annotations

import argparse

from .common import add_common

DESCRIPTION = """\
--format vllm writes OUT/adapter (a PEFT LoRA adapter vLLM's --enable-lora accepts, with explicit
zero weights on decoder layer 0 so the maths is unchanged), the gate files and OUT/README.md with the
`vllm serve` and `prism serve --route-only` commands."""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export the adapter + gate for vLLM",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  prism export --prism runs/demo/prism --format vllm runs/demo/vllm",
    )
    p.add_argument("--prism", required=True, metavar="ART", help="artifact directory (RUN/prism)")
    p.add_argument("--format", default="vllm", choices=["vllm"], help="export format (default vllm)")
    p.add_argument("out", metavar="OUT", help="output directory")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT")
    add_common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..errors import PrismError
    from ..gated.export import export

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise PrismError(f"export target {args.out} is an existing file; give a directory")

    out = export(args.prism, args.out, fmt=args.format, overwrite=args.overwrite)
    print(f"exported to {out}; see {out / 'README.md'} for the vLLM command")
    return 0
