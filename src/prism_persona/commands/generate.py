"""`prism generate`: answer a JSONL file of prompts with a PRISM model (batched, routed per row)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import add_common

DESCRIPTION = """\
Read prompts from a JSONL file (each line an object with "prompt": "..." or "messages": [{"role",
"content"}, ...]), answer them with the PRISM model (each row routed by the gate inside the
prefill, or forced with --force), and write each input object plus "response", "routed" and
"gate_prob" to the output JSONL."""

EXAMPLES = """examples:
  prism generate --prism runs/demo/prism --input prompts.jsonl --output out.jsonl
  prism generate --prism runs/demo/prism --input prompts.jsonl --output base.jsonl --force off
"""


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="answer a JSONL file of prompts with a PRISM model",
                       description=DESCRIPTION, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--input", required=True, help="JSONL file, one object per line with 'prompt' or 'messages'")
    p.add_argument("--output", required=True, help="JSONL file to write (input objects + response, routed, gate_prob)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="token budget per answer (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling when temperature > 0")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    add_common(p)
    p.set_defaults(func=run)


def add_model_args(p) -> None:
    """--prism, --force, --device, --dtype, --batch-size (shared with `prism chat`)."""
    p.add_argument("--prism", required=True, help="PRISM artifact directory (RUN/prism)")
    p.add_argument("--force", choices=["on", "off"], help="ignore the gate: LoRA always on, or always off (base model)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--batch-size", type=int, default=None, help="rows per batch (default: the artifact's)")


def force_value(flag):
    return None if flag is None else flag == "on"


def read_prompts(path: str) -> list[tuple[dict, list]]:
    """(input object, chat) per line; a bad line is a one-line error naming it."""
    from ..errors import PrismError

    p = Path(path)
    if not p.is_file():
        raise PrismError(f"input file not found: {path}")
    rows = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PrismError(f"{path}: line {n} is not valid JSON ({exc.msg})") from None
        rows.append((obj, chat_of(obj, f"{path}: line {n}")))
    return rows


def chat_of(obj, where: str) -> list:
    from ..errors import PrismError

    if not isinstance(obj, dict):
        raise PrismError(f"{where} must be a JSON object with 'prompt' or 'messages'")
    if isinstance(obj.get("messages"), list) and obj["messages"]:
        msgs = obj["messages"]
        ok = all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                 and isinstance(m.get("content"), str) for m in msgs)
        if not ok or not any(m["role"] == "user" for m in msgs):
            raise PrismError(f"{where}: 'messages' must be a list of {{role, content}} with at least one user turn")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if isinstance(obj.get("prompt"), str) and obj["prompt"].strip():
        return [{"role": "user", "content": obj["prompt"]}]
    raise PrismError(f"{where} has no non-empty 'prompt' string or 'messages' list")


def load_gated(args):
    from ..gated.model import GatedModel

    return GatedModel.from_pretrained(args.prism, device=args.device, dtype=args.dtype, batch_size=args.batch_size)


def run(args) -> int:
    rows = read_prompts(args.input)
    from ..engines.base import SamplingParams

    gm = load_gated(args)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    chunk = max(1, gm.batch_size) * 8
    routed = 0
    with open(out, "w", encoding="utf-8") as fh:
        for start in range(0, len(rows), chunk):
            part = rows[start:start + chunk]
            comps = gm.generate([c for _, c in part], params, force=force_value(args.force))
            for (obj, _), comp in zip(part, comps):
                rec = dict(obj, response=comp.text, routed=comp.meta["routed"], gate_prob=round(comp.meta["gate_prob"], 6))
                routed += int(comp.meta["routed"])
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            fh.flush()
    print(f"wrote {len(rows)} answers to {out} ({routed} routed to the persona LoRA)", file=sys.stderr)
    return 0
