"""`prism chat`: talk to a PRISM model; each conversation is routed once, from its first message."""

from __future__ import annotations

import argparse
import sys

from .common import add_common, prism_optional

DESCRIPTION = """\
Interactive chat with a PRISM model. The gate decides from your first message whether the distilled
persona behaviour (LoRA) is switched on, and the decision is kept for the whole conversation.
Commands: /reset starts a new conversation, /quit leaves. Works with piped stdin too:
  printf 'Write a haiku about rain\\n/quit\\n' | prism chat --prism runs/demo/prism
With --engine vllm the model runs on a vLLM server PRISM starts (the gate still decides here); without
--prism, --engine vllm|openai chats with a base model (--model)."""


def add_parser(sub) -> None:
    from ..command_settings import ChatSettings
    from ..options import add_flags

    p = sub.add_parser(
        "chat",
        help="chat with a PRISM model (routing shown per conversation)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_flags(p, ChatSettings)
    prism_optional(p)
    add_common(p)
    p.set_defaults(func=run)


def read_line() -> str:
    """One line of stdin; bytes that are not UTF-8 are a one-line error, not a traceback."""
    from ..config import MAX_TEXT_CHARS, check_text
    from ..errors import PrismError

    try:
        line = sys.stdin.readline(MAX_TEXT_CHARS + 2)  # never more than the longest message in memory
        line.encode("utf-8")  # a piped stdin decodes with surrogateescape: undecodable bytes arrive as surrogates
    except (UnicodeDecodeError, UnicodeEncodeError):
        raise PrismError("stdin is not UTF-8 text; prism chat reads one UTF-8 line per message") from None
    return check_text(line.rstrip("\r\n"), "a prism chat message") + line[len(line.rstrip("\r\n")) :]


def describe(routed: bool, prob: float, forced: bool, abstained: bool = False, persona=None, persona_prob=None) -> str:
    """The routing line of a conversation: ``persona NAME ON`` with the gate's probability of that persona
    (a K-way artifact, or a binary one whose persona has a name), else ``persona LoRA ON/off``."""
    how = "forced" if forced else f"gate p={prob:.2f}"
    if abstained and not forced:
        how += ", abstained: the query is unlike the gate's training queries"
    if routed and persona:
        p = "" if persona_prob is None else f", p={persona_prob:.2f}"
        return f"[routing: persona {persona} ON ({how}{p})]"
    return f"[routing: persona LoRA {'ON' if routed else 'off'} ({how})]"


def run(args) -> int:
    from ..command_settings import ChatSettings
    from ..config import check_text
    from ..options import settings_from_args
    from ..serve.offline import check_engine_settings, force_value, open_chat

    settings = settings_from_args(ChatSettings, args)
    check_text(settings.system, "--system")  # before the model loads
    check_engine_settings(settings)
    reply, close = open_chat(settings, args.quiet)
    try:
        return converse(settings.system, force_value(settings.routing.force), reply)
    finally:
        close()


def converse(system: str, forced, reply) -> int:
    """The read-answer loop; ``reply(chat, force)`` -> Completion (``meta`` with the gate's decision,
    or none for a base model)."""
    interactive = sys.stdin.isatty()
    if interactive:
        print("PRISM chat. /reset = new conversation, /quit = leave.")
    chat: list = [{"role": "system", "content": system}] if system else []
    decision = None
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = read_line()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            chat = [{"role": "system", "content": system}] if system else []
            decision = None
            print("(new conversation)")
            continue
        chat.append({"role": "user", "content": text})
        # later turns keep the first turn's decision: its persona by name where it has one
        force = forced if forced is not None else (decision[2] or decision[0] if decision else None)
        comp = reply(chat, force)
        if decision is None:
            meta = comp.meta or {}
            decision = (meta.get("routed", False), meta.get("gate_prob"), meta.get("persona"))
            print(
                describe(
                    decision[0],
                    decision[1],
                    forced is not None,
                    bool(meta.get("abstained")),
                    meta.get("persona"),
                    meta.get("persona_prob"),
                )
                if decision[1] is not None
                else "[base model: no PRISM gate]"
            )
        print(f"prism> {comp.text}", flush=True)
        chat.append({"role": "assistant", "content": comp.text})
    return 0
