"""Engines on a server for the commands that are not a bootstrap: `prism eval`, `study`, `generate`, `chat`.

:class:`ServerSystems` opens the one server a command's :class:`~prism_persona.config.EngineConfig` asks
for, on first use, and hands out the engines of the systems PRISM knows:

* ``base()``: the base model (``vllm``: a managed server, or one attached with ``--base-url``;
  ``openai``: any OpenAI-compatible server, ``--model`` = its served name);
* ``routed(force)`` (an engine that serves adapters, with a PRISM artifact): a
  :class:`~.routed.RoutedEngine` -- the artifact's exported adapter is served next to the base (the
  engine's ``adapter_engine`` hook), the gate runs here on decoder layer 0 and sends each row to one
  or the other (``force``: True = LoRA on every row, False = base).

``close()`` stops a server it started (idempotent).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..config import ModelConfig
from ..errors import PrismError


def artifact_base_model(artifact: str | Path, model: Optional[str]) -> str:
    """The artifact's base model; a ``model`` naming another one is a one-line error (one server
    serves the base and the adapter)."""
    from ..models import resolve_model
    from .artifact import Artifact

    base = Artifact.read(Path(artifact).expanduser().resolve()).base_model
    if model and resolve_model(model).display != resolve_model(base).display:
        raise PrismError(
            f"the PRISM artifact's base model is {resolve_model(base).display}: one vLLM server serves "
            f"it and the adapter, so drop --model {model}"
        )
    return base


def check_server_model(engine, model: Optional[str]) -> None:
    """An engine whose ``--model`` is the name the server serves needs one (a one-line error)."""
    from ..engines import engine_spec

    if engine_spec(engine.engine).served_model_name and not model:
        raise PrismError(f"--engine {engine.engine} needs --model: the model name the server at --base-url serves")


def open_server_systems(
    engine,
    model: Optional[str],
    out: str | Path,
    quiet: bool = False,
    artifact: Optional[str | Path] = None,
    load: Optional[ModelConfig] = None,
) -> ServerSystems:
    """The :class:`ServerSystems` of a command's engine block and model flags: the server runs the
    artifact's base model (``model`` must agree), else ``model`` (default: the embedded model; for an
    engine whose ``--model`` is the served name, required). ``load``: the command's model block (dtype,
    device, batch size, trust flag; its ``model`` field is ignored: ``model`` and the artifact decide)."""
    from dataclasses import replace

    from ..config import EMBEDDED_MODEL

    check_server_model(engine, model)
    base = artifact_base_model(artifact, model) if artifact else model
    settings = replace(load or ModelConfig(), model=base or EMBEDDED_MODEL)
    return ServerSystems(engine, settings, out, quiet, artifact or None)


class ServerSystems:
    """The server behind a command's systems, opened on first use (see the module docstring)."""

    def __init__(self, engine, model, out: str | Path, quiet: bool = False, artifact: Optional[str | Path] = None):
        """``engine``: an :class:`~prism_persona.config.EngineConfig` of a server engine; ``model``: a
        :class:`~prism_persona.config.ModelConfig` (the model the server runs, its dtype and device: the
        router loads on that device); a started server logs to ``OUT/logs/vllm.log``."""
        from ..config import RunConfig
        from ..engines import check_engine, engine_spec

        self.spec = engine_spec(engine.engine)
        if artifact is not None and not self.spec.serves_adapters:
            raise PrismError(
                f"a PRISM artifact's lora/prism rows need the adapter on a server that serves adapters: use "
                f"{adapter_engines_text()} (with --base-url to attach to one that serves it as 'prism')"
            )
        self.cfg = RunConfig(out=str(out), quiet=quiet, model=model, engine=engine)  # what the engines read
        self.artifact = Path(artifact).expanduser().resolve() if artifact is not None else None
        self.trust_remote_code = model.trust_remote_code
        self._engine = None
        self._adapter_name = ""
        self._router = None
        check_engine(self.cfg)  # vLLM missing: a one-line error before any data is read

    def base(self):
        """The engine on the server's base model (started on the first call)."""
        if self._engine is None:
            if self.artifact is None:
                from ..engines import make_engine

                self._engine = make_engine(self.cfg)
            else:  # the engine exports the adapter only when it starts the server (attached: served already)
                from .artifact import Artifact

                artifact = self.artifact
                personas = Artifact.read(artifact, need_adapter=False).personas
                named = {"names": personas} if len(personas) > 1 else {}  # K-way: each adapter by its name
                self._engine, self._adapter_name = self.spec.adapter_engine(
                    self.cfg, lambda: export_for_server(artifact, self.cfg.quiet)[1:], **named
                )
        return self._engine

    def routed(self, force: Optional[bool] = None):
        """The artifact on the server: the gate here (layer 0), base or adapter per row there."""
        from .routed import RoutedEngine

        if self.artifact is None:
            raise PrismError("routing needs a PRISM artifact (--prism ART)")
        server = self.base()  # the server first: a missing adapter is reported before the router loads
        if self._router is None:
            from .router import load_router

            m = self.cfg.model
            self._router = load_router(str(self.artifact), m.device, m.dtype, self.trust_remote_code)
        return RoutedEngine(server, self._router, self._adapter_name, force=force)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None


# --------------------------------------------------------------------------------------------------
# serving a PRISM artifact: a server with the base model and the adapter, the gate router in front


def adapter_engines_text() -> str:
    """``--engine vllm``: the registered engines that serve a PRISM artifact's adapter."""
    from ..engines import engine_names, engine_spec

    return " or ".join(f"--engine {n}" for n in engine_names() if engine_spec(n).serves_adapters)


def export_for_server(artifact: str | Path, quiet: bool = False):
    """``(base model source, exported adapter dir, max LoRA rank)``: the artifact's base model prepared
    for a server (GGUF de-quantised once, cached) and its adapter exported into PRISM's cache (layer 0 of
    the LoRA zero, as the gate leaves it), keyed by the artifact's path. A K-way artifact (one adapter per
    persona) gives ``{persona: exported adapter dir}`` instead of one dir, and the largest rank."""
    import hashlib
    import json

    from ..models import cache_root, prepare_model, resolve_model
    from .artifact import Artifact
    from .export import export, vllm_max_lora_rank

    art = Path(artifact).expanduser().resolve()
    read = Artifact.read(art)
    src = prepare_model(resolve_model(read.base_model), quiet=quiet)
    work = cache_root() / "serve" / f"{art.name}-{hashlib.sha256(str(art).encode()).hexdigest()[:12]}"
    exported = export(art, work / "vllm-export", overwrite=True)
    names = read.personas
    dirs = {name: exported / "adapter" / name if k else exported / "adapter" for k, name in enumerate(names)}
    rank = max(
        int(json.loads((d / "adapter_config.json").read_text(encoding="utf-8")).get("r", 16)) for d in dirs.values()
    )
    return src, dirs if len(names) > 1 else dirs[names[0]], vllm_max_lora_rank(rank)


def start_for_artifact(engine, artifact: str | Path, quiet: bool = False):
    """Export ``artifact`` (:func:`export_for_server`) and start the server of the engine block ``engine``
    with the base model (served under its display name) and the adapter: ``(server, adapter name)``.
    ``prism serve --engine vllm`` puts the route-only router in front."""
    from ..engines import engine_spec

    spec = engine_spec(engine.engine)
    if spec.adapter_server is None:
        raise PrismError(f"--engine {spec.name} starts no server for an artifact")
    src, adapter, max_rank = export_for_server(artifact, quiet)
    first = next(iter(adapter.values())) if isinstance(adapter, dict) else adapter  # RUN/.../vllm-export/adapter
    return spec.adapter_server(engine, src, adapter, max_rank, first.parents[1], quiet)
