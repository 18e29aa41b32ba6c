"""`prism chat`: talk to a PRISM model; each conversation is routed once, from its first message."""

from __future__ import annotations

import argparse
import sys

from .common import add_common
from .generate import add_model_args, force_value

DESCRIPTION = """\
Interactive chat with a PRISM model. The gate decides from your first message whether the distilled
persona behaviour (LoRA) is switched on, and the decision is kept for the whole conversation.
Commands: /reset starts a new conversation, /quit leaves. Works with piped stdin too:
  printf 'Write a haiku about rain\\n/quit\\n' | prism chat --prism runs/demo/prism"""


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with a PRISM model (routing shown per conversation)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--max-new-tokens", type=int, default=256, help="token budget per answer (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--system", help="system message for every conversation")
    add_common(p)
    p.set_defaults(func=run)


def describe(routed: bool, prob: float, forced: bool) -> str:
    how = "forced" if forced else f"gate p={prob:.2f}"
    return f"[routing: persona LoRA {'ON' if routed else 'off'} ({how})]"


def run(args) -> int:
    from ..engines.base import SamplingParams
    from .generate import load_gated

    gm = load_gated(args)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    forced = force_value(args.force)
    interactive = sys.stdin.isatty()
    if interactive:
        print("PRISM chat. /reset = new conversation, /quit = leave.")
    chat: list = [{"role": "system", "content": args.system}] if args.system else []
    decision = None
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            chat = [{"role": "system", "content": args.system}] if args.system else []
            decision = None
            print("(new conversation)")
            continue
        chat.append({"role": "user", "content": text})
        force = forced if forced is not None else (decision[0] if decision else None)
        comp = gm.generate([chat], params, force=force)[0]
        if decision is None:
            decision = (comp.meta["routed"], comp.meta["gate_prob"])
            print(describe(decision[0], decision[1], forced is not None))
        print(f"prism> {comp.text}", flush=True)
        chat.append({"role": "assistant", "content": comp.text})
    return 0
