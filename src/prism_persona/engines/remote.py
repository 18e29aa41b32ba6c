"""Engines on a server for the commands that are not a bootstrap: `prism eval`, `study`, `generate`, `chat`.

:func:`server_run_config` turns a command's flags (engine, model, base URL, vLLM python and flags)
into the :class:`~prism_persona.config.RunConfig` that :class:`~.vllm.VLLMEngine` and
:class:`~.openai.OpenAIEngine` read; :class:`ServerSystems` opens the one server a command needs,
on first use, and hands out the engines of the systems PRISM knows:

* ``base()``: the base model (``vllm``: a managed server, or one attached with ``--base-url``;
  ``openai``: any OpenAI-compatible server, ``--model`` = its served name);
* ``routed(force)`` (``vllm`` with a PRISM artifact): a :class:`~.routed.RoutedEngine` -- the
  artifact's exported adapter is served as ``prism`` next to the base, the gate runs here on decoder
  layer 0 and sends each row to one or the other (``force``: True = LoRA on every row, False = base).

``close()`` stops a server it started (idempotent).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

from ..errors import PrismError

SERVER_ENGINES = ("vllm", "openai")


def server_run_config(
    engine: str,
    model: Optional[str],
    out: str | Path,
    quiet: bool = False,
    base_url: str = "",
    vllm_python: str = "",
    vllm_args: str = "",
    concurrency: int = 0,
    dtype: str = "auto",
    device: str = "auto",
    batch_size: int = 8,
    trust_remote_code: bool = False,
):
    """A validated RunConfig whose ``engine`` and ``model`` sections say what the flags say; a started
    server logs to ``OUT/logs/vllm.log``."""
    from ..config import EMBEDDED_MODEL, resolve

    engine_section = {
        "engine": engine,
        "base_url": base_url or "",
        "concurrency": int(concurrency or 0),
        "vllm_python": vllm_python or "",
        "vllm_args": shlex.split(vllm_args or ""),
    }
    model_section = {
        "model": model or EMBEDDED_MODEL,
        "dtype": dtype or "auto",
        "device": device or "auto",
        "batch_size": int(batch_size or 8),
        "trust_remote_code": bool(trust_remote_code),
    }
    return resolve(overrides={"out": str(out), "quiet": quiet, "model": model_section, "engine": engine_section})


def artifact_base_model(artifact: str | Path, model: Optional[str]) -> str:
    """The artifact's base model; a ``model`` naming another one is a one-line error (one server
    serves the base and the adapter)."""
    from ..gated.artifact import Artifact
    from ..models import resolve_model

    base = Artifact.read(Path(artifact).expanduser().resolve()).base_model
    if model and resolve_model(model).display != resolve_model(base).display:
        raise PrismError(
            f"the PRISM artifact's base model is {resolve_model(base).display}: one vLLM server serves "
            f"it and the adapter, so drop --model {model}"
        )
    return base


class ServerSystems:
    """The server behind a command's systems, opened on first use (see the module docstring)."""

    def __init__(self, run_cfg, artifact: Optional[str | Path] = None, trust_remote_code: bool = False):
        from . import check_engine

        if artifact is not None and run_cfg.engine.engine != "vllm":
            raise PrismError(
                "a PRISM artifact's lora/prism rows need the adapter on a vLLM server: use --engine vllm "
                "(with --base-url to attach to one that serves it as 'prism')"
            )
        self.cfg = run_cfg
        self.artifact = Path(artifact).expanduser().resolve() if artifact is not None else None
        self.trust_remote_code = trust_remote_code
        self._engine = None
        self._router = None
        check_engine(run_cfg)  # vLLM missing: a one-line error before any data is read

    def base(self):
        """The engine on the server's base model (started on the first call)."""
        if self._engine is None:
            if self.cfg.engine.engine == "openai":
                from .openai import OpenAIEngine

                self._engine = OpenAIEngine.from_config(self.cfg)
            elif self.artifact is None:
                from .vllm import VLLMEngine

                self._engine = VLLMEngine.from_config(self.cfg)
            elif self.cfg.engine.base_url:  # attached: the server must already serve the adapter by name
                from .vllm import LORA_NAME, VLLMEngine

                self._engine = VLLMEngine.from_config(self.cfg, loras={LORA_NAME: ""})
            else:
                from .vllm import LORA_NAME, VLLMEngine, export_for_vllm

                _, adapter, max_rank = export_for_vllm(self.artifact, self.cfg.quiet)
                self._engine = VLLMEngine.from_config(self.cfg, loras={LORA_NAME: str(adapter)}, max_lora_rank=max_rank)
        return self._engine

    def routed(self, force: Optional[bool] = None):
        """The artifact on the server: the gate here (layer 0), base or adapter per row there."""
        from .routed import RoutedEngine
        from .vllm import LORA_NAME

        if self.artifact is None:
            raise PrismError("routing needs a PRISM artifact (--prism ART)")
        server = self.base()  # the server first: a missing adapter is reported before the router loads
        if self._router is None:
            from ..serve.backend import load_router

            m = self.cfg.model
            self._router = load_router(str(self.artifact), m.device, m.dtype, self.trust_remote_code)
        return RoutedEngine(server, self._router, LORA_NAME, force=force)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
