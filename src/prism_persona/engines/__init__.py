"""Text generation and log-probability scoring behind one small interface, and the registry of engines.

``Engine.generate`` is the one method every engine implements; ``Engine.score_choices`` is optional
(engines that cannot return log-probabilities return ``None`` and judges fall back to parsing text).

An engine is one module (of this package, or any importable one) that declares ``ENGINE = EngineSpec(...)``:
its name, its options (a dataclass of ``option(...)`` fields: they join the ``[engine]`` block with their
flags, help and bounds), how it is built from a :class:`~prism_persona.config.RunConfig`, and hooks that
callers use instead of naming it (its settings' rules, serving a PRISM artifact's adapter, starting a
server for `prism serve`). Adding one = the module + its name in :data:`ENGINE_MODULES` (from another
installed package: its ``prism_persona.engines`` entry point, :func:`load_plugins`). Engine modules import
nothing heavy at the top (torch loads when an engine is built), so the registry loads with ``prism --help``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, fields

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
    "load_plugins",
    "make_engine",
    "register_module",
    "unregister",
]

ENGINE_MODULES = ("hf", "vllm", "openai")
"""The engine modules of this package, each declaring ``ENGINE``; their order is the ``--engine`` choices'
(the one line that registers an engine)."""


@dataclass(frozen=True)
class EngineSpec:
    """What PRISM knows about an engine without building it (see :mod:`prism_persona.engines`): its name,
    its options, and hooks that callers use instead of asking which engine it is."""

    name: str
    build: Callable
    """``build(cfg, model=None, tokenizer=None) -> Engine`` from a RunConfig (``model``/``tokenizer``:
    weights already loaded in this process, used by an in-process engine)."""
    options: type | None = None
    """The engine's own settings: a dataclass of :func:`~prism_persona.config.option` fields named
    ``<name>_...``; they join the ``[engine]`` block (``engine.<field>`` keys, their flags and bounds)."""
    how_to_run: tuple = ()
    """Fields of :attr:`options` that run code or reach the network: used only when typed on this command
    line, never taken from a file (:func:`prism_persona.config.engine_how_to_run`)."""
    in_process: bool = False
    """Runs the model in this process (no server: requests are not in flight, identities carry no
    ``@name``). Callers outside this package ask the hooks below instead, each for what it needs."""
    shares_model: bool = False
    """``build(cfg, model, tokenizer)`` runs on weights the caller already loaded in this process: the
    pipeline loads the base model once and shares it with the bootstrap, the gate and distillation."""
    gated_model: bool = False
    """A PRISM artifact under this engine is PRISM's own GatedModel in this process (`prism generate`,
    `chat`, `serve` and `eval --prism` load it; no server, no adapter export), so `prism generate`'s
    answers depend on the artifact and the sampling alone and resume whatever the engine settings; the
    command's base model (eval's ``--model``) is then this engine's ``build`` in this process."""
    needs_base_url: bool = False
    """Talks to a server someone else runs: ``engine.base_url`` is required."""
    served_model_name: bool = False
    """``--model`` is the name the server serves (required; not a model PRISM can load)."""
    check: Callable | None = None
    """``check(cfg)``: one-line errors before slow work (a missing model, no vLLM)."""
    rules: Callable | None = None
    """``rules(engine_cfg)``: the rules across the engine's own options (config files and flags alike;
    checked whichever engine is in use, as a bound is)."""
    flag_rules: Callable | None = None
    """``flag_rules(engine_cfg, chosen)``: flags typed for this engine that make no sense on this command
    line (``chosen``: whether this engine is the one in use)."""
    uses: Callable | None = None
    """``uses(engine_cfg, name) -> bool``: whether this engine reads the engine setting ``name`` (default:
    its own options, and ``base_url``/``api_key_env`` for a server engine)."""
    adapter_engine: Callable | None = None
    """``adapter_engine(cfg, export[, names=]) -> (engine, adapter name)``: the base model and a PRISM
    artifact's adapter on one server (rows pick one by model name); ``export()`` -> ``(adapter dir, LoRA
    rank)`` writes the adapter, called only when the server is started here. A K-way artifact passes
    ``names`` (its personas) and its ``export()`` gives ``{persona: dir}``: each adapter served under its
    persona's name. None: serves no adapters."""
    adapter_server: Callable | None = None
    """``adapter_server(engine_cfg, src, adapter_dir, rank, log_dir, quiet) -> (server, adapter name)``:
    a started server of ``src`` (a resolved model) and the adapter (``{persona: dir}`` for a K-way
    artifact: each served under its persona's name), with ``base_url``, ``served_name`` and
    ``stop()`` (`prism serve` routes to it). None: this engine starts no server for `prism serve`."""

    @property
    def server(self) -> bool:
        """Generation happens on an HTTP server (requests in flight, identities carry ``@name``)."""
        return not self.in_process

    @property
    def serves_adapters(self) -> bool:
        """The server also serves a PRISM artifact's adapter (its lora/prism rows, routed per row here)."""
        return self.adapter_engine is not None

    def validate(self, engine_cfg, chosen: bool = True) -> None:
        """One-line errors for this engine's settings (``EngineConfig.validate`` calls it for every engine;
        ``chosen``: this engine is the one in use)."""
        if chosen and self.needs_base_url and not engine_cfg.base_url:
            raise PrismError(f"--engine {self.name} needs --base-url (e.g. http://127.0.0.1:8000/v1)")
        if self.rules is not None:
            self.rules(engine_cfg)

    def check_flags(self, engine_cfg, chosen: bool) -> None:
        """Command-line mistakes with this engine's flags (``EngineConfig.check_flags`` calls it)."""
        if self.flag_rules is not None:
            self.flag_rules(engine_cfg, chosen)

    def reads(self, engine_cfg, name: str) -> bool:
        """Whether this engine, so configured, reads the engine setting ``name``."""
        if self.uses is not None:
            return bool(self.uses(engine_cfg, name))
        own = self.options is not None and name in {f.name for f in fields(self.options)}
        return own or (self.server and name in ("base_url", "api_key_env")) or name == "engine"


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


def register_module(module: str) -> EngineSpec:
    """Add the engine that the importable module ``module`` declares as ``ENGINE``: the one line an engine
    outside this package needs in code (inside it: its name in :data:`ENGINE_MODULES`; in an installed
    package: its ``prism_persona.engines`` entry point, :func:`load_plugins`). Its options join the
    ``[engine]`` block and ``--engine`` takes its name from then on in this process."""
    return _register(importlib.import_module(module), module)


def _register(mod, where: str) -> EngineSpec:
    specs = _load()
    spec = getattr(mod, "ENGINE", None)
    if not isinstance(spec, EngineSpec):
        raise PrismError(f"engine module {where} declares no ENGINE = EngineSpec(...)")
    if spec.name in specs and specs[spec.name] is not spec:
        raise PrismError(f"engine '{spec.name}' (from {where}) is registered already")
    _config.register_engine(spec.name, spec)
    _REGISTRY[spec.name] = spec
    return spec


def load_plugins() -> list[str]:
    """Register the engines of the installed packages: each ``prism_persona.engines`` entry point names a
    module declaring ``ENGINE`` (the `prism` CLI calls this before it builds its parser). Returns their
    names; a module that fails to import is a one-line error (:mod:`prism_persona.plugins`)."""
    from ..plugins import ENGINE_GROUP, load_group

    return [_register(mod, f"{name} = {getattr(mod, '__name__', mod)}").name for name, mod in load_group(ENGINE_GROUP)]


def unregister(name: str) -> None:
    """Remove the engine ``name`` and its options (tests that add a toy engine)."""
    _REGISTRY.pop(name, None)
    _config.unregister_engine(name)


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
