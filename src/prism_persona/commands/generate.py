"""`prism generate`: answer a JSONL file of prompts with a PRISM model (batched, routed per row)."""

from __future__ import annotations

import argparse
import sys

from .common import add_common, prism_optional

DESCRIPTION = """\
Read prompts from a JSONL file (each line an object with "prompt": "..." or "messages": [{"role",
"content"}, ...]), answer them with the PRISM model (each row routed by the gate inside the
prefill, or forced with --force), and write each input object plus "response", "routed",
"gate_prob", "persona" (the routed persona's name; null on the base model or for an artifact whose
one adapter has no name) and "persona_prob" (the gate's probability of that persona) to the output
JSONL ("abstained" and "outside" too when the gate can abstain). --force on|off|PERSONA overrides the gate.

The answers go to OUTPUT.partial as they finish and OUTPUT appears, whole, only at the end; run the
same command again after an interruption and the rows already answered are kept, not redone."""

EXAMPLES = """examples:
  prism generate --prism runs/demo/prism --input prompts.jsonl --output out.jsonl
  prism generate --prism runs/demo/prism --input prompts.jsonl --output base.jsonl --force off
  prism generate --prism runs/two/prism --input prompts.jsonl --output story.jsonl --force storyteller
  prism generate --prism runs/demo/prism --engine vllm --input prompts.jsonl --output out.jsonl
  prism generate --engine vllm --model Qwen/Qwen2.5-0.5B-Instruct --input prompts.jsonl --output base.jsonl
  prism generate --engine openai --base-url http://host:8000/v1 --model NAME --input p.jsonl --output o.jsonl
"""


def add_parser(sub) -> None:
    from ..command_settings import GenerateSettings
    from ..options import add_flags

    p = sub.add_parser(
        "generate",
        help="answer a JSONL file of prompts with a PRISM model",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_flags(p, GenerateSettings)
    prism_optional(p)
    add_common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..command_settings import GenerateSettings
    from ..options import settings_from_args
    from ..serve.offline import answer_file, check_engine_settings

    settings = settings_from_args(GenerateSettings, args)
    check_engine_settings(settings)
    out, rows, routed = answer_file(settings, args.quiet)
    print(f"wrote {rows} answers to {out} ({routed} routed to the persona LoRA{per_persona(out)})", file=sys.stderr)
    return 0


def per_persona(out) -> str:
    """``: story 2, monitor 1`` - the routed rows per named persona of the output file ('' when none is named)."""
    import json
    from collections import Counter

    lines = out.read_text(encoding="utf-8").split("\n")  # not splitlines: U+2028 may sit inside a record
    counts = Counter(p for p in (json.loads(line).get("persona") for line in lines if line) if p)
    return ": " + ", ".join(f"{name} {n}" for name, n in counts.most_common()) if counts else ""
