"""Running a model over a file of prompts, or one conversation, without a server in front: the library of
`prism generate` and `prism chat`.

A PRISM artifact runs in this process (:class:`~prism_persona.gated.model.GatedModel`, under an engine
whose spec says ``gated_model``) or on a server engine (the gate here, generation there: :mod:`prism_persona.gated.remote`);
a server engine can also run a base model alone. :func:`answer_file` writes the answers to
``OUTPUT.partial`` as they finish and renames it to ``OUTPUT`` at the end; rerun after an interruption,
it keeps the rows already answered.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..config import check_text
from ..errors import PrismError


def check_engine_settings(settings) -> None:
    """One-line errors for an engine that cannot run what ``settings`` (GenerateSettings or ChatSettings)
    ask, before anything loads; ``EngineConfig.validate`` has checked the engine's own flags."""
    from ..config import server_engines_text
    from ..engines import engine_spec
    from ..gated.remote import adapter_engines_text, check_server_model

    spec = engine_spec(settings.engine.engine)
    load, routing = settings.load, settings.routing
    if spec.gated_model:  # the artifact is PRISM's own GatedModel, in this process
        if settings.model:
            raise PrismError(f"--model needs {server_engines_text()}")
        if not load.prism:
            raise PrismError(f"--prism ART is required (or {server_engines_text()} with --model M for a base model)")
        check_force(load.prism, routing.force)
        return
    if load.prism and not spec.serves_adapters:
        raise PrismError(
            f"--engine {spec.name} runs a base model only; for --prism use {adapter_engines_text()} (with "
            "--base-url to attach to a server that serves the adapter as 'prism')"
        )
    check_server_model(settings.engine, settings.model)
    if routing.force and not load.prism:
        raise PrismError("--force needs --prism (without an artifact there is no LoRA to switch)")
    if load.prism:
        check_force(load.prism, routing.force)


def check_force(artifact: str, flag: str) -> None:
    """``--force PERSONA``: a persona of the artifact (read before the model loads), else a one-line error."""
    if flag in ("", "on", "off"):
        return
    from ..gated.artifact import Artifact
    from ..gated.model import persona_names, persona_of_force

    art = Artifact.read(artifact, need_adapter=False)
    try:
        persona_of_force(persona_names(art.gate(), art.config), flag)
    except ValueError as e:
        raise PrismError(f"--force {flag}: {e}") from None


def open_server_engine(settings, out_dir, quiet: bool = False):
    """``(engine, close)`` on a server engine: the artifact routed per row, or the base model (``--model``)."""
    from dataclasses import replace

    from ..config import ModelConfig
    from ..gated.remote import open_server_systems

    load, routing = settings.load, settings.routing
    model = ModelConfig(dtype=load.dtype, device=load.device, trust_remote_code=load.trust_remote_code)
    if routing.batch_size:  # else the model block's default
        model = replace(model, batch_size=routing.batch_size)
    systems = open_server_systems(settings.engine, settings.model or None, out_dir, quiet, load.prism or None, model)
    engine = systems.routed(force_value(routing.force)) if load.prism else systems.base()
    return engine, systems.close


def open_chat(settings, quiet: bool = False):
    """``(reply, close)`` for `prism chat`: ``reply(chat, force)`` -> Completion; a server engine is
    routed from the conversation's first turn by its gate, the in-process GatedModel is told ``force``."""
    from ..engines import engine_spec

    params = sampling_params(settings)
    if engine_spec(settings.engine.engine).gated_model:
        gm = load_gated(settings.load, settings.routing)
        return (lambda chat, force: gm.generate([chat], params, force=force)[0]), gm.close
    from ..models import cache_root

    engine, close = open_server_engine(settings, cache_root() / "chat", quiet)
    return (lambda chat, force: engine.generate([chat], params)[0]), close


def answer_file(settings, quiet: bool = False) -> tuple[Path, int, int]:
    """Answer ``settings.input`` into ``settings.output`` (GenerateSettings); resumes an interrupted run.
    Returns (output path, rows, rows routed to the persona LoRA)."""
    from dataclasses import asdict

    from ..engines import engine_spec

    rows = read_prompts(settings.input)
    out, partial, meta = output_paths(settings)
    gated_here = engine_spec(settings.engine.engine).gated_model  # the answers depend on the artifact alone
    identity = {
        "input_sha256": file_sha256(settings.input),
        "prism": str(Path(settings.load.prism).resolve()) if settings.load.prism else "",
        "force": settings.routing.force,
        "sampling": asdict(settings.sampling),
    }
    if not gated_here:  # another engine's answers are not resumed into this file
        identity.update(engine=settings.engine.engine, model=settings.model or "", base_url=settings.engine.base_url)
    done = resume_point(partial, meta, identity)
    if done < len(rows) and gated_here:
        write_answers(settings, rows, partial, done)
    elif done < len(rows):
        server, close = open_server_engine(settings, out.parent, quiet)
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
    return out, len(rows), routed


def force_value(flag: str):
    """``--force``: '' = the gate decides (None), on = True, off = False, else the persona's name."""
    if not flag:
        return None
    return flag == "on" if flag in ("on", "off") else flag


def read_prompts(path: str) -> list[tuple[dict, list]]:
    """(input object, chat) per line; a bad line or a file that is not UTF-8 is a one-line error."""
    from ..userfiles import jsonl_rows, read_user_text

    text = read_user_text(path, "input file")
    rows = []
    for n, obj in jsonl_rows(text, lambda n, why: f"{path}: line {n} is not valid JSON ({why})"):
        rows.append((obj, chat_of(obj, f"{path}: line {n}")))
    return rows


def chat_of(obj, where: str) -> list:
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
        check_text("".join(m["content"] for m in msgs), f"{where}: 'messages'")  # the whole chat reaches the model
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if isinstance(obj.get("prompt"), str) and obj["prompt"].strip():
        return [{"role": "user", "content": check_text(obj["prompt"], f"{where}: 'prompt'")}]
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


def sampling_params(settings):
    from ..engines.base import SamplingParams

    s = settings.sampling
    return SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, seed=s.seed)


def write_answers(settings, rows, partial: Path, start: int) -> None:
    """An engine whose artifact runs as the GatedModel (``EngineSpec.gated_model``): it answers ``rows[start:]``."""
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
    """``routed``, ``gate_prob``, ``persona`` (the routed persona's name, null on the base model or for a
    binary artifact's unnamed adapter), ``persona_prob`` (the gate's probability of that persona), and
    ``abstained`` and ``outside`` when the gate can abstain; ``persona`` keys only where the engine reports
    them."""
    meta = comp.meta or {}
    prob = meta.get("gate_prob")
    out = {"routed": bool(meta.get("routed", False)), "gate_prob": None if prob is None else round(float(prob), 6)}
    if "persona" in meta:
        pp = meta.get("persona_prob")
        out.update(persona=meta["persona"], persona_prob=None if pp is None else round(float(pp), 6))
    for key in ("abstained", "outside"):  # the artifact's gate can abstain
        if key in meta:
            out[key] = bool(meta[key])
    return out
