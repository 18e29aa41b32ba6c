"""Engines on a server for the commands that are not a bootstrap: `prism eval`, `study`, `generate`, `chat`.

:class:`ServerSystems` opens the one server a command's :class:`~prism_persona.config.EngineConfig` asks
for, on first use, and hands out the engines of the systems PRISM knows:

* ``base()``: the base model (``vllm``: a managed server, or one attached with ``--base-url``;
  ``openai``: any OpenAI-compatible server, ``--model`` = its served name);
* ``routed(force)`` (an engine that serves adapters, with a PRISM artifact): a
  :class:`~.routed.RoutedEngine` -- the artifact's exported adapter is served as ``prism`` next to the
  base, the gate runs here on decoder layer 0 and sends each row to one or the other (``force``: True =
  LoRA on every row, False = base).

``close()`` stops a server it started (idempotent).
"""

from __future__ import annotations

from collections.abc import Sequence
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

        if artifact is not None and not engine_spec(engine.engine).serves_adapters:
            raise PrismError(
                "a PRISM artifact's lora/prism rows need the adapter on a vLLM server: use --engine vllm "
                "(with --base-url to attach to one that serves it as 'prism')"
            )
        self.cfg = RunConfig(out=str(out), quiet=quiet, model=model, engine=engine)  # what the engines read
        self.artifact = Path(artifact).expanduser().resolve() if artifact is not None else None
        self.trust_remote_code = model.trust_remote_code
        self._engine = None
        self._router = None
        check_engine(self.cfg)  # vLLM missing: a one-line error before any data is read

    def base(self):
        """The engine on the server's base model (started on the first call)."""
        if self._engine is None:
            if self.artifact is None:
                from ..engines import make_engine

                self._engine = make_engine(self.cfg)
            elif self.cfg.engine.base_url:  # attached: the server must already serve the adapter by name
                from ..engines.vllm import LORA_NAME, VLLMEngine

                self._engine = VLLMEngine.from_config(self.cfg, loras={LORA_NAME: ""})
            else:
                from ..engines.vllm import LORA_NAME, VLLMEngine

                _, adapter, max_rank = export_for_vllm(self.artifact, self.cfg.quiet)
                self._engine = VLLMEngine.from_config(self.cfg, loras={LORA_NAME: str(adapter)}, max_lora_rank=max_rank)
        return self._engine

    def routed(self, force: Optional[bool] = None):
        """The artifact on the server: the gate here (layer 0), base or adapter per row there."""
        from ..engines.vllm import LORA_NAME
        from .routed import RoutedEngine

        if self.artifact is None:
            raise PrismError("routing needs a PRISM artifact (--prism ART)")
        server = self.base()  # the server first: a missing adapter is reported before the router loads
        if self._router is None:
            from .router import load_router

            m = self.cfg.model
            self._router = load_router(str(self.artifact), m.device, m.dtype, self.trust_remote_code)
        return RoutedEngine(server, self._router, LORA_NAME, force=force)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None


# --------------------------------------------------------------------------------------------------
# serving a PRISM artifact: vLLM with the base model and the adapter, the gate router in front


def export_for_vllm(artifact: str | Path, quiet: bool = False):
    """``(base model source, exported adapter dir, max LoRA rank)``: the artifact's base model prepared
    for vLLM (GGUF de-quantised once, cached) and its adapter exported into PRISM's cache (layer 0 of
    the LoRA zero, as the gate leaves it), keyed by the artifact's path."""
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
    rank = int(json.loads((exported / "adapter" / "adapter_config.json").read_text(encoding="utf-8")).get("r", 16))
    return src, exported / "adapter", vllm_max_lora_rank(rank)


def start_for_artifact(
    artifact: str | Path,
    python: str = "",
    extra_args: Sequence[str] = (),
    cpu_cores: str = "",
    kv_cache_gib: int = 4,
    quiet: bool = False,
):
    """Export ``artifact`` for vLLM (:func:`export_for_vllm`) and start a vLLM server with the base
    model (served under its display name) and the adapter (served as ``prism``). ``prism serve
    --engine vllm`` puts the route-only router in front."""
    from ..engines.vllm import LORA_NAME, VLLMServer, _eager, find_vllm_python, server_dtype

    src, adapter, max_rank = export_for_vllm(artifact, quiet)
    server = VLLMServer(
        src.path_or_id,
        src.display,
        find_vllm_python(python),
        adapter.parents[1] / "vllm.log",
        loras={LORA_NAME: str(adapter)},
        dtype=server_dtype("auto"),
        max_lora_rank=max_rank,
        eager=_eager("auto"),
        cpu_cores=cpu_cores,
        kv_cache_gib=kv_cache_gib,
        extra_args=list(extra_args),
        quiet=quiet,
    )
    return server.start()
