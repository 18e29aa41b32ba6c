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
  prism generate --prism runs/demo/prism --engine vllm --input prompts.jsonl --output out.jsonl
  prism generate --engine vllm --model Qwen/Qwen2.5-0.5B-Instruct --input prompts.jsonl --output base.jsonl
  prism generate --engine openai --base-url http://host:8000/v1 --model NAME --input p.jsonl --output o.jsonl
"""

ENGINE_HELP = "engine (where the text is generated)"


def add_parser(sub) -> None:
    from ..config import GenerateSettings, add_flags

    p = sub.add_parser(
        "generate",
        help="answer a JSONL file of prompts with a PRISM model",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_flags(p, GenerateSettings)
    add_engine_flags(p)
    add_common(p)
    p.set_defaults(func=run)


def add_engine_flags(p) -> None:
    """--engine and its companions (`prism generate` and `prism chat`); --prism becomes optional, as a
    server engine can run the base model alone."""
    for action in p._actions:
        if "--prism" in action.option_strings:
            action.required = False
            action.help = "PRISM artifact directory (RUN/prism); needed with --engine hf (the default)"
    g = p.add_argument_group(ENGINE_HELP)
    g.add_argument(
        "--engine",
        choices=["hf", "vllm", "openai"],
        default="hf",
        help="hf: the PRISM model in this process (default); vllm: a vLLM server PRISM starts (or "
        "--base-url) with the artifact's adapter, the gate routing each row here -- or, without "
        "--prism, the base model (--model); openai: the base model on any OpenAI-compatible "
        "server at --base-url (--model = its served name)",
    )
    g.add_argument(
        "--model",
        help="the model without --prism (--engine vllm: default the embedded SmolLM2; "
        "--engine openai: the served model name)",
    )
    g.add_argument(
        "--base-url",
        help="a running server, e.g. http://127.0.0.1:8000/v1 (needed for --engine openai; "
        "--engine vllm attaches to it instead of starting one)",
    )
    g.add_argument("--vllm-python", help="Python that runs vLLM (default: the venv of scripts/setup_vllm.sh)")
    g.add_argument("--vllm-args", default="", help='extra vLLM server arguments, e.g. "--tensor-parallel-size 4"')
    g.add_argument("--concurrency", type=int, default=0, help="requests in flight (0 = 64 for vllm, 8 for openai)")


def check_engine_flags(args, load, routing) -> None:
    """One-line errors for engine flag combinations, before anything loads."""
    from ..config import check_base_url
    from ..errors import PrismError

    engine = getattr(args, "engine", "hf")
    if engine == "hf":
        extra = [
            f
            for f, v in (
                ("--model", args.model),
                ("--base-url", args.base_url),
                ("--vllm-python", args.vllm_python),
                ("--vllm-args", args.vllm_args),
            )
            if v
        ]
        if extra:
            raise PrismError(f"{extra[0]} needs --engine vllm or --engine openai")
        if not load.prism:
            raise PrismError("--prism ART is required (or --engine vllm|openai --model M for a base model)")
        return
    if args.concurrency < 0:
        raise PrismError(f"--concurrency must be at least 0, got {args.concurrency}")
    if args.base_url:
        check_base_url(args.base_url)
    if engine == "openai":
        if not args.base_url:
            raise PrismError("--engine openai needs --base-url (e.g. http://127.0.0.1:8000/v1)")
        if load.prism:
            raise PrismError(
                "--engine openai runs a base model only; for --prism use --engine vllm (with --base-url "
                "to attach to a vLLM that serves the adapter as 'prism')"
            )
        if not args.model:
            raise PrismError("--engine openai needs --model: the model name the server serves")
    if (args.vllm_python or args.vllm_args) and (engine != "vllm" or args.base_url):
        raise PrismError("--vllm-python/--vllm-args start a vLLM server: use them with --engine vllm and no --base-url")
    if routing.force and not load.prism:
        raise PrismError("--force needs --prism (without an artifact there is no LoRA to switch)")


def open_server_engine(args, load, routing, out_dir):
    """``(engine, close)`` for --engine vllm|openai: the artifact routed per row (vLLM), or the base model."""
    from ..engines.remote import ServerSystems, artifact_base_model, server_run_config

    model = artifact_base_model(load.prism, args.model) if load.prism else args.model
    cfg = server_run_config(
        args.engine,
        model,
        out_dir,
        quiet=args.quiet,
        base_url=args.base_url or "",
        vllm_python=args.vllm_python or "",
        vllm_args=args.vllm_args or "",
        concurrency=args.concurrency,
        dtype=load.dtype,
        device=load.device,
        batch_size=routing.batch_size or 8,
        trust_remote_code=load.trust_remote_code,
    )
    systems = ServerSystems(cfg, load.prism or None, load.trust_remote_code)
    engine = systems.routed(force_value(routing.force)) if load.prism else systems.base()
    return engine, systems.close


def force_value(flag: str):
    return None if not flag else flag == "on"


def read_prompts(path: str) -> list[tuple[dict, list]]:
    """(input object, chat) per line; a bad line or a file that is not UTF-8 is a one-line error."""
    from ..userfiles import jsonl_rows, read_user_text

    text = read_user_text(path, "input file")
    rows = []
    for n, obj in jsonl_rows(text, lambda n, why: f"{path}: line {n} is not valid JSON ({why})"):
        rows.append((obj, chat_of(obj, f"{path}: line {n}")))
    return rows


def chat_of(obj, where: str) -> list:
    from ..errors import PrismError

    if not isinstance(obj, dict):
        raise PrismError(f"{where} must be a JSON object with 'prompt' or 'messages'")
    if isinstance(obj.get("messages"), list) and obj["messages"]:
        msgs = obj["messages"]
        ok = all(
            isinstance(m, dict)
            and m.get("role") in ("system", "user", "assistant")
            and isinstance(m.get("content"), str)
            for m in msgs
        )
        if not ok or not any(m["role"] == "user" for m in msgs):
            raise PrismError(f"{where}: 'messages' must be a list of {{role, content}} with at least one user turn")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if isinstance(obj.get("prompt"), str) and obj["prompt"].strip():
        return [{"role": "user", "content": obj["prompt"]}]
    raise PrismError(f"{where} has no non-empty 'prompt' string or 'messages' list")


def load_gated(load, routing):
    """The GatedModel of ``load`` (LoadSettings) with ``routing.batch_size`` (shared with `prism chat`)."""
    from ..gated.model import GatedModel

    return GatedModel.from_pretrained(
        load.prism,
        device=load.device,
        dtype=load.dtype,
        batch_size=routing.batch_size,
        trust_remote_code=load.trust_remote_code,
    )


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
    check_engine_flags(args, settings.load, settings.routing)
    rows = read_prompts(settings.input)
    out, partial, meta = output_paths(settings)
    engine = getattr(args, "engine", "hf")
    identity = {
        "input_sha256": file_sha256(settings.input),
        "prism": str(Path(settings.load.prism).resolve()) if settings.load.prism else "",
        "force": settings.routing.force,
        "sampling": asdict(settings.sampling),
    }
    if engine != "hf":  # another engine's answers are not resumed into this file
        identity.update(engine=engine, model=args.model or "", base_url=args.base_url or "")
    done = resume_point(partial, meta, identity)
    if done < len(rows) and engine == "hf":
        write_answers(settings, rows, partial, done)
    elif done < len(rows):
        server, close = open_server_engine(args, settings.load, settings.routing, out.parent)
        try:
            write_rows(
                lambda chats: server.generate(chats, sampling_params(settings)),
                rows,
                partial,
                done,
                max(8, 2 * int(getattr(server, "preferred_call_size", 0) or 0)),
            )
        finally:
            close()
    os.replace(partial, out)
    meta.unlink(missing_ok=True)
    routed = sum(int(json.loads(line)["routed"]) for line in out.read_text(encoding="utf-8").split("\n") if line)
    print(f"wrote {len(rows)} answers to {out} ({routed} routed to the persona LoRA)", file=sys.stderr)
    return 0


def sampling_params(settings):
    from ..engines.base import SamplingParams

    s = settings.sampling
    return SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, seed=s.seed)


def write_answers(settings, rows, partial: Path, start: int) -> None:
    gm = load_gated(settings.load, settings.routing)
    params, force = sampling_params(settings), force_value(settings.routing.force)
    write_rows(lambda chats: gm.generate(chats, params, force=force), rows, partial, start, max(1, gm.batch_size) * 8)


def write_rows(generate, rows, partial: Path, start: int, chunk: int) -> None:
    """Answer ``rows[start:]`` ``chunk`` at a time, each chunk appended to ``partial`` and synced.
    ``routed``/``gate_prob``: the gate's decision (``false``/``null`` for a base model without one)."""
    with open(partial, "a", encoding="utf-8") as fh:
        for begin in range(start, len(rows), chunk):
            part = rows[begin : begin + chunk]
            comps = generate([c for _, c in part])
            fh.write(
                "".join(
                    json.dumps(dict(obj, response=comp.text, **routing_fields(comp)), ensure_ascii=False) + "\n"
                    for (obj, _), comp in zip(part, comps)
                )
            )
            fh.flush()
            os.fsync(fh.fileno())


def routing_fields(comp) -> dict:
    meta = comp.meta or {}
    prob = meta.get("gate_prob")
    return {"routed": bool(meta.get("routed", False)), "gate_prob": None if prob is None else round(float(prob), 6)}
