"""Turning an :class:`~.settings.EvalConfig` (`prism eval` / `prism study` flags) into loaded benchmarks, engines,
a judge and a runner."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..config import PERSONA_LENGTHS
from ..errors import PrismError
from ..judges import REFUSAL_CLASSIFIERS, CallableEngine, EvalJudge, load_grader, make_refusal_classifier
from .benchmarks import REGISTRY, load_plugins
from .evaluate import Benchmarks
from .runner import EvalRunner
from .settings import LOCAL_JUDGE_ENGINE
from .systems import EngineProvider, PersonaBook, load_persona_file, load_run_personas, parse_match

if TYPE_CHECKING:
    from .settings import EvalConfig

log = logging.getLogger(__name__)


def all_benchmarks() -> tuple[str, ...]:
    """Every name ``--benchmarks`` accepts one by one (each registered benchmark's members)."""
    return tuple(m for b in REGISTRY.values() for m in b.members)


def parse_benchmarks(text: Optional[str]) -> list[str]:
    """``"mmlu,mtbench,safety"`` -> names; a family's name (``safety``) means all its sets (the harmful
    sets and the benign, over-refusal, one). Default: every benchmark (each from its hub dataset unless a
    flag gives a path). Benchmarks of other packages (entry points) are registered first."""
    load_plugins()
    if not text:
        return [m for b in REGISTRY.values() if b.default for m in b.members]
    families = {b.name: b.members for b in REGISTRY.values() if b.sets}
    out: list[str] = []
    for name in (t.strip().lower() for t in text.split(",") if t.strip()):
        for n in families.get(name, (name,)):
            if n not in all_benchmarks():
                raise PrismError(
                    f"unknown benchmark '{n}'; choose from {', '.join(all_benchmarks())} or {', '.join(families)}"
                )
            if n not in out:
                out.append(n)
    return out


def load_benchmarks(cfg: EvalConfig, names: list[str], limit: Optional[int] = None) -> Benchmarks:
    """Load the chosen benchmarks (``--limit`` items each, spread over categories)."""
    lim = limit if limit is not None else cfg.limit
    return Benchmarks(**{b.name: b.load(cfg, names, lim) for b in REGISTRY.values()})


def _model_display(spec: Optional[str]) -> str:
    from ..models import resolve_model

    return resolve_model(spec).display


def build_provider(cfg: EvalConfig, quiet: bool, out: str) -> EngineProvider:
    """Engines for base/persona (``--model``) and lora/prism (``--prism``), loaded on first use.

    With ``--prism`` and no ``--model``, base is the gated model with the adapter forced off
    (the same weights, loaded once). A server engine (``--engine vllm|openai``): :func:`build_remote_provider`.
    """
    from ..engines import engine_spec

    if not engine_spec(cfg.engine.engine).gated_model:  # the artifact is not PRISM's GatedModel here
        return build_remote_provider(cfg, quiet, out)
    factories: dict = {}
    identities: dict = {}
    holder: dict = {}
    art = Path(cfg.prism).expanduser().resolve() if cfg.prism else None
    if art is not None:
        from ..gated.artifact import Artifact, content_id

        base_model = Artifact.read(art).base_model

        def gated():
            if "gm" not in holder:
                from ..gated.model import GatedModel

                holder["gm"] = GatedModel.from_pretrained(
                    art,
                    device=cfg.device,
                    dtype=cfg.dtype,
                    batch_size=cfg.batch_size,
                    trust_remote_code=cfg.trust_remote_code,
                )
            return holder["gm"]

        factories["lora"] = lambda: gated().as_engine(force=True)
        factories["prism"] = lambda: gated().as_engine(force=None)
        named = f"{art}#{content_id(art)}"  # the files, not only the path: a re-assembled artifact never
        identities["lora"] = f"lora:{named}"  # reuses the answers of the one before
        identities["prism"] = f"prism:{named}"
        if not cfg.model:
            factories["base"] = lambda: gated().as_engine(force=False)
            identities["base"] = f"base:{_model_display(base_model)}"
    if "base" not in factories:
        spec = cfg.model

        def base():
            return local_engine(cfg, cfg.engine.engine, spec, quiet)

        factories["base"] = base
        identities["base"] = f"base:{_model_display(spec)}"
    return EngineProvider(factories, identities)


def build_remote_provider(cfg: EvalConfig, quiet: bool, out: str) -> EngineProvider:
    """A server engine (``--engine vllm`` / ``--engine openai``): every system on one server, started on
    first use (:class:`~prism_persona.gated.remote.ServerSystems`).

    vLLM with ``--prism`` serves the artifact's base model and its exported adapter (as ``prism``);
    the gate routes each row in this process from decoder layer 0 (``gated.router.load_router``):
    base = the base model, lora = the adapter on every row, prism = the gate's choice per row.
    Identities carry the engine (``@vllm``), so responses cached from the HF engine are not reused.
    """
    from ..engines import engine_spec
    from ..gated.remote import open_server_systems

    art = Path(cfg.prism).expanduser().resolve() if cfg.prism else None
    name = cfg.engine.engine
    systems = open_server_systems(cfg.engine, cfg.model, out, quiet, art, cfg.model_block())
    suffix = f"@{name}"
    # a served model name is shown as given; a model PRISM resolved, by its display name
    shown = cfg.model if engine_spec(name).served_model_name else _model_display(systems.cfg.model.model)
    factories: dict = {"base": systems.base}
    identities = {"base": f"base:{shown}{suffix}"}
    if art is not None:
        factories["lora"] = lambda: systems.routed(True)
        factories["prism"] = lambda: systems.routed(None)
        from ..gated.artifact import content_id

        named = f"{art}#{content_id(art)}{suffix}"
        identities["lora"] = f"lora:{named}"
        identities["prism"] = f"prism:{named}"
    provider = EngineProvider(factories, identities)
    provider.closers.append(systems.close)
    return provider


def build_judge(cfg: EvalConfig, provider: EngineProvider, quiet: bool, out: str) -> EvalJudge:
    """``--grader module:function`` (prompt -> reply text), else ``--judge``: ``self`` (the base engine)
    or another model id/path, in this process or on the server of ``--judge-engine``."""
    mode = cfg.judge_mode
    tokens = cfg.judge_tokens
    if cfg.grader:
        return EvalJudge(CallableEngine(load_grader(cfg.grader), cfg.grader), f"callable:{cfg.grader}", "text", tokens)
    spec = (cfg.judge or "").strip()  # None or empty: the base model judges
    if spec in ("", "self"):
        return EvalJudge(provider.get("base"), f"self:{provider.identity('base')}", mode, tokens)
    from ..engines import engine_spec

    name = cfg.judge_engine or LOCAL_JUDGE_ENGINE
    if engine_spec(name).server:
        engine = server_judge_engine(cfg, spec, provider, quiet, out)
        return EvalJudge(engine, f"model:{spec}@{cfg.judge_engine}", mode, tokens)
    engine = local_engine(cfg, name, spec, quiet)
    return EvalJudge(engine, f"model:{engine.model_name}", mode, tokens)


def local_engine(cfg: EvalConfig, engine: str, model: Optional[str], quiet: bool):
    """The engine ``engine`` built in this process (its ``build``) on ``model`` (default: the embedded
    model) with the command's model flags and engine settings."""
    from dataclasses import replace

    from ..config import RunConfig
    from ..engines import make_engine

    block = cfg.model_block()
    block = replace(block, model=model) if model else block
    return make_engine(RunConfig(quiet=quiet, model=block, engine=replace(cfg.engine, engine=engine)))


def server_judge_engine(cfg: EvalConfig, model: str, provider: EngineProvider, quiet: bool, out: str):
    """The judge model on a server (``--judge-engine vllm|openai``): ``--engine``'s settings with the
    judge's engine and URL; a vLLM server started for it logs to ``OUT/judge/logs/vllm.log`` and stops
    with the eval's engines."""
    from dataclasses import replace

    from ..gated.remote import open_server_systems

    engine = replace(cfg.engine, engine=cfg.judge_engine, base_url=cfg.judge_base_url)
    systems = open_server_systems(engine, model, Path(out) / "judge", quiet, None, cfg.model_block())
    provider.closers.append(systems.close)
    return systems.base()


def build_personas(cfg: EvalConfig) -> PersonaBook:
    """Personas from ``--persona-json`` and ``--persona-file DOMAIN=PATH`` (the files win for their
    domains), else ``--personas RUN``, else the run beside ``--prism``."""
    from ..bootstrap.common import persona_file_text

    personas: dict = load_persona_file(cfg.persona_json) if cfg.persona_json else {}
    for domain, path in cfg.persona_files.items():
        personas[domain] = dict.fromkeys(PERSONA_LENGTHS, persona_file_text(path, domain))
    if not personas:
        personas = _run_personas(cfg)
    if not personas:
        log.info("no personas given: using built-in generic expert personas per category")
    return PersonaBook(personas, parse_match(cfg.persona_map), seed=cfg.seed)


def _run_personas(cfg: EvalConfig) -> dict:
    """The personas of ``--personas RUN``, else of the run beside ``--prism`` (empty when there are none)."""
    if cfg.personas:
        return load_run_personas(cfg.personas)
    run = Path(cfg.prism).expanduser().resolve().parent if cfg.prism else None
    return load_run_personas(run) if run and (run / "personas.jsonl").is_file() else {}


def build_runner(cfg: EvalConfig, out: str, quiet: bool = False) -> EvalRunner:
    provider = build_provider(cfg, quiet, out)
    spec = cfg.refusal_classifier
    refusal = None
    if spec not in REFUSAL_CLASSIFIERS:  # a user function: import it now (one-line error before any model loads)
        refusal = make_refusal_classifier(spec, lambda: None, cfg)
    return EvalRunner(
        out,
        provider,
        personas=build_personas(cfg),
        settings=cfg,
        judge_factory=lambda: build_judge(cfg, provider, quiet, out),
        refusal=refusal,
        refusal_spec=spec,
    )


def add_eval_options(p, skip: tuple = ()) -> None:
    """Flags shared by `prism eval` and `prism study`, derived from :class:`EvalConfig` (standard library only),
    plus ``--persona-file DOMAIN=PATH`` (repeatable, the contract of `prism run`)."""
    from ..options import add_flags
    from .settings import G_DATA, G_PERSONAS, EvalConfig

    groups = add_flags(p, EvalConfig, skip=skip)
    groups[G_PERSONAS].add_argument(
        "--persona-file",
        dest="persona_files",
        action="append",
        default=[],
        metavar="DOMAIN=PATH",
        help="use this text file verbatim as DOMAIN's persona (repeatable; as in prism run)",
    )
    groups[G_DATA].add_argument(
        "--data",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a local copy of any registered benchmark's (or set's) data, e.g. --data pku=pku.json (repeatable)",
    )


def eval_config(args, skip: tuple = ()):
    """The :class:`EvalConfig` of parsed flags (defaults from the dataclass; bounds checked, one-line errors)."""
    from ..bootstrap.common import persona_files_from_flags
    from ..options import settings_from_args
    from .settings import EvalConfig

    cfg = settings_from_args(EvalConfig, args, skip=skip)
    cfg.persona_files = persona_files_from_flags(getattr(args, "persona_files", None) or [])
    cfg.data = data_paths_from_flags(getattr(args, "data", None) or [])
    return cfg


def data_paths_from_flags(items) -> dict:
    """``{benchmark or set: path}`` from ``--data NAME=PATH`` values (one-line errors: unknown name, no ``=``)."""
    load_plugins()
    known = {m for bench in REGISTRY.values() for m in bench.members}
    paths = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise PrismError(f"--data wants NAME=PATH, got '{item}'")
        if name.strip() not in known:
            raise PrismError(f"--data {name.strip()}: no such benchmark (known: {', '.join(sorted(known))})")
        paths[name.strip()] = path.strip()
    return paths
