"""Text generation and log-probability scoring behind one small interface, and the registry of engines.

``Engine.generate`` is the one method every engine implements; ``Engine.score_choices`` is optional
(engines that cannot return log-probabilities return ``None`` and judges fall back to parsing text).

An engine is one module of this package that declares ``ENGINE = EngineSpec(...)``: its name, how it
is built from a :class:`~prism_persona.config.RunConfig` and what callers may ask of it (a server? does it
need a base URL? does it start a server of its own?). Adding one = the module + its name in
:data:`ENGINE_MODULES`. Engine modules import nothing heavy at the top (torch loads when an engine is
built), so the registry loads with ``prism --help``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from .. import config as _config
from ..errors import PrismError
from .base import Completion, Engine, SamplingParams

__all__ = [
    "Completion",
    "Engine",
    "EngineSpec",
    "SamplingParams",
    "check_engine",
    "engine_names",
    "engine_spec",
    "make_engine",
]

ENGINE_MODULES = ("hf", "vllm", "openai")
"""The engine modules of this package, each declaring ``ENGINE``; their order is the ``--engine`` choices'
(the one line that registers an engine)."""


@dataclass(frozen=True)
class EngineSpec:
    """What PRISM knows about an engine without building it (see :mod:`prism_persona.engines`)."""

    name: str
    build: Callable
    """``build(cfg, model=None, tokenizer=None) -> Engine`` from a RunConfig (``model``/``tokenizer``:
    weights already loaded in this process, used by an in-process engine)."""
    in_process: bool = False
    """Runs the model in this process (shares loaded weights; a PRISM artifact runs as a GatedModel)."""
    needs_base_url: bool = False
    """Talks to a server someone else runs: ``engine.base_url`` is required."""
    starts_server: bool = False
    """Starts a server of its own unless ``base_url`` attaches to one (``vllm_python``/``vllm_args`` apply)."""
    serves_adapters: bool = False
    """The server also serves a PRISM artifact's adapter (its lora/prism rows, routed per row here)."""
    served_model_name: bool = False
    """``--model`` is the name the server serves (required; not a model PRISM can load)."""
    check: Callable | None = None
    """``check(cfg)``: one-line errors before slow work (a missing model, no vLLM)."""

    @property
    def server(self) -> bool:
        """Generation happens on an HTTP server (requests in flight, identities carry ``@name``)."""
        return not self.in_process


_REGISTRY: dict[str, EngineSpec] = {}


def _load() -> dict[str, EngineSpec]:
    """The registry, loaded on first use: each module's ``ENGINE``, also handed to the config checks."""
    if not _REGISTRY:
        for module in ENGINE_MODULES:
            name = module if "." in module else f"{__name__}.{module}"  # a dotted name: a module elsewhere
            spec = importlib.import_module(name).ENGINE
            _REGISTRY[spec.name] = spec
            _config.register_engine(spec.name, spec)
    return _REGISTRY


def engine_names() -> list[str]:
    """The registered engine names (the ``--engine`` choices)."""
    return list(_load())


def engine_spec(name: str) -> EngineSpec:
    """The registered engine ``name``; a one-line error for an unknown one."""
    specs = _load()
    if name not in specs:
        raise PrismError(f"unknown engine '{name}'; choose one of: {', '.join(specs)}")
    return specs[name]


def check_engine(cfg) -> None:
    """One-line errors for an engine that cannot be built (bad settings, missing model, no vLLM), before
    slow work."""
    spec = engine_spec(cfg.engine.engine)
    cfg.engine.validate()
    if spec.check is not None:
        spec.check(cfg)


def make_engine(cfg, model=None, tokenizer=None) -> Engine:
    """Build the engine a :class:`~prism_persona.config.RunConfig` asks for (heavy imports inside); an
    in-process engine shares ``model``/``tokenizer`` if given. ``close()`` releases what it started."""
    spec = engine_spec(cfg.engine.engine)
    cfg.engine.validate()
    return spec.build(cfg, model, tokenizer)


_load()
