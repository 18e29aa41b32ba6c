"""`prism generate`: answer a JSONL file of prompts with a PRISM model (batched, routed per row)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .common import add_common

DESCRIPTION = """\
Read prompts from a JSONL file (each line an object with "prompt": "..." or "messages": [{"role",
"content"}, ...]), answer them with the PRISM model (each row routed by the gate inside the
prefill, or forced with --force), and write each input object plus "response", "routed" and
"gate_prob" to the output JSONL.

The answers go to OUTPUT.partial as they finish and OUTPUT appears, whole, only at the end; run the
same command again after an interruption and the rows already answered are kept, not redone."""

EXAMPLES = """examples:
  prism generate --prism runs/demo/prism --input prompts.jsonl --output out.jsonl
  prism generate --prism runs/demo/prism --input prompts.jsonl --output base.jsonl --force off
"""


def add_parser(sub) -> None:
    from ..config import GenerateSettings, add_flags

    p = sub.add_parser("generate", help="answer a JSONL file of prompts with a PRISM model",
                       description=DESCRIPTION, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, GenerateSettings)
    add_common(p)
    p.set_defaults(func=run)


def force_value(flag: str):
    return None if not flag else flag == "on"


def read_prompts(path: str) -> list[tuple[dict, list]]:
    """(input object, chat) per line; a bad line or a file that is not UTF-8 is a one-line error."""
    from ..errors import PrismError, read_user_text

    text = read_user_text(path, "input file")
    rows = []
    # JSON Lines records end at "\n" only: str.splitlines() would also split inside a query at U+0085/U+2028
    for n, line in enumerate(text.split("\n"), 1):
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


def load_gated(load, routing):
    """The GatedModel of ``load`` (LoadSettings) with ``routing.batch_size`` (shared with `prism chat`)."""
    from ..gated.model import GatedModel

    return GatedModel.from_pretrained(load.prism, device=load.device, dtype=load.dtype,
                                      batch_size=routing.batch_size, trust_remote_code=load.trust_remote_code)


# --------------------------------------------------------------------------------------------------
# an output written atomically and resumed


def output_paths(settings) -> tuple[Path, Path, Path]:
    """(output, OUTPUT.partial, OUTPUT.partial.json); refuses --output == --input and an unwritable path."""
    from ..errors import PrismError

    out = Path(settings.output).expanduser()
    if out.exists() and out.resolve() == Path(settings.input).expanduser().resolve():
        raise PrismError("--output is the --input file; write the answers to another file")
    if out.is_dir():
        raise PrismError(f"--output {out} is a directory; give a file path")
    partial = out.with_name(out.name + ".partial")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise PrismError(f"cannot write --output {out}: {exc.strerror or exc}") from None
    return out, partial, out.with_name(out.name + ".partial.json")


def resume_point(partial: Path, meta: Path, identity: dict) -> int:
    """Rows already answered in ``partial`` by the same input and settings (a torn last line is cut);
    0, and a fresh file, when it was written by anything else."""
    import logging

    log = logging.getLogger("prism_persona")
    saved = None
    if meta.is_file():
        try:
            saved = json.loads(meta.read_text(encoding="utf-8"))
        except ValueError:
            saved = None
    raw = partial.read_bytes() if partial.is_file() else b""
    if saved != identity or not raw:
        if raw:
            log.warning("%s was written with another input or other settings; starting over", partial)
        partial.write_bytes(b"")
        meta.write_text(json.dumps(identity, sort_keys=True), encoding="utf-8")
        return 0
    keep = raw[: raw.rfind(b"\n") + 1]  # complete lines only
    if len(keep) < len(raw):
        partial.write_bytes(keep)
    done = keep.count(b"\n")
    if done:
        log.info("resuming %s: %d rows already answered", partial, done)
    return done


def file_sha256(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run(args) -> int:
    from dataclasses import asdict

    from ..config import GenerateSettings, settings_from_args

    settings = settings_from_args(GenerateSettings, args)
    rows = read_prompts(settings.input)
    out, partial, meta = output_paths(settings)
    identity = {"input_sha256": file_sha256(settings.input), "prism": str(Path(settings.load.prism).resolve()),
                "force": settings.routing.force, "sampling": asdict(settings.sampling)}
    done = resume_point(partial, meta, identity)
    if done < len(rows):
        write_answers(settings, rows, partial, done)
    os.replace(partial, out)
    meta.unlink(missing_ok=True)
    routed = sum(int(json.loads(line)["routed"]) for line in out.read_text(encoding="utf-8").split("\n") if line)
    print(f"wrote {len(rows)} answers to {out} ({routed} routed to the persona LoRA)", file=sys.stderr)
    return 0


def write_answers(settings, rows, partial: Path, start: int) -> None:
    from ..engines.base import SamplingParams

    gm = load_gated(settings.load, settings.routing)
    s = settings.sampling
    params = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, seed=s.seed)
    chunk = max(1, gm.batch_size) * 8
    with open(partial, "a", encoding="utf-8") as fh:
        for begin in range(start, len(rows), chunk):
            part = rows[begin:begin + chunk]
            comps = gm.generate([c for _, c in part], params, force=force_value(settings.routing.force))
            fh.write("".join(json.dumps(dict(obj, response=comp.text, routed=comp.meta["routed"],
                                             gate_prob=round(comp.meta["gate_prob"], 6)), ensure_ascii=False) + "\n"
                             for (obj, _), comp in zip(part, comps)))
            fh.flush()
            os.fsync(fh.fileno())
