"""The stages of a run, in order: the one list of their names, what each depends on and where it lives.

``--redo`` choices, what ``--redo`` removes, the settings checked before a run resumes, the done
markers and every stage the pipeline runs are read from this registry (:func:`all_stages`). A stage is
one module with two functions named here -- ``settings(cfg) -> dict`` (everything its output depends
on) and ``step(ctx)`` (the work, given a :class:`StageContext`) -- and one :func:`register` call adds a
new one. Standard library only (``prism --help`` reads it).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Optional

BOOTSTRAP, TRAINING = "bootstrap", "training"


@dataclass(frozen=True)
class Stage:
    name: str
    """The ``--redo`` name; the records of a bootstrap stage are ``RUN/<name>.jsonl``."""
    depends_on: tuple[str, ...]
    """Stages whose output this one reads: redoing one of them redoes this one too."""
    module: str
    """The module that owns the stage (its settings, its step and its config block): relative to
    ``prism_persona`` when it starts with a dot, else an absolute module name (a plug-in stage)."""
    files: tuple[str, ...]
    """What ``--redo`` removes (files and directories in the run directory)."""
    stores: tuple[str, ...] = ()
    """The JSONL stores whose settings are checked before a run resumes (bootstrap stages)."""
    marker: str = ""
    """The ``<marker>.done.json`` written when the stage (and the ones it ends) is done."""
    kind: str = BOOTSTRAP
    """``bootstrap``: writes records with the run's engine / judge, every run (records already written
    are kept); ``training``: trains on the labelled pairs with the loaded model, skipped once its marker
    exists (then its saved settings are checked against the current ones)."""
    section: str = ""
    """The ``RunConfig`` block this stage owns (``ctx.options``); no module outside ``module`` reads it
    (tests/test_stages.py checks). Empty for a stage without a block of its own."""
    settings: str = ""
    """The stage's ``settings(cfg) -> dict`` function in ``module`` (default ``<name>_settings``): everything its output depends on,
    upstream stages included (a bootstrap stage's records are checked against it before a run resumes,
    a finished training stage before it is skipped). Each stage module owns its settings."""
    step: str = "step"
    """The stage's ``step(ctx: StageContext) -> None`` function in ``module``: one signature for every
    stage; the pipeline calls the steps in registry order."""
    check: str = ""
    """Optional ``check(cfg)`` in ``module``: one-line errors for the stage's settings (a file that
    cannot be read ...), called before anything runs or loads."""
    prepare: str = ""
    """Optional ``prepare(ctx)`` in ``module``, called (training stages not yet done) once the shared
    model is loaded and before any stage writes: a setting checked against the model."""

    @classmethod
    def training(cls, name: str, depends_on: tuple[str, ...], module: str, section: str = "", **kw: Any) -> Stage:
        """A stage that trains on the labelled data: files in ``RUN/<name>/``, done marker
        ``<name>.done.json``."""
        files = (f"{name}.done.json", name)
        return cls(name, depends_on, module, files, marker=name, kind=TRAINING, section=section, **kw)

    def __post_init__(self) -> None:
        if not self.settings:
            object.__setattr__(self, "settings", f"{self.name}_settings")

    def function(self, which: str) -> Callable:
        """The function this stage names for ``which`` (``"settings"``, ``"step"``, ``"prepare"``);
        its module is imported now."""
        return getattr(importlib.import_module(self.module, __package__), getattr(self, which))


@dataclass
class StageContext:
    """What a stage's ``step`` receives: the run, the shared handles and the stage's own settings.

    The pipeline builds one per stage from a shared base (:meth:`for_stage`); ``outputs`` is shared by
    every stage of one invocation (a stage publishes what later ones read, e.g. ``personas``)."""

    cfg: Any
    """The run's ``RunConfig`` (a step reads its own block through ``options``)."""
    run: Any
    """The run directory (:class:`prism_persona.store.RunDir`)."""
    engine: Callable[[], Any] = lambda: None
    """The run's engine, built on first call (bootstrap stages)."""
    judge: Callable[[], Any] = lambda: None
    """The run's judge, built on first call (bootstrap stages)."""
    model: Any = None
    """The shared base model (training stages; None where no stage needs it)."""
    tokenizer: Any = None
    records: Any = None
    """The labelled pairs (training stages)."""
    outputs: dict = field(default_factory=dict)
    """What earlier stages of this invocation published (``ctx.outputs["personas"]`` ...)."""
    quiet: bool = False
    stage: Optional[Stage] = None
    options: Any = None
    """The stage's own ``RunConfig`` block (``cfg.<stage.section>``), None when it has none."""
    settings: Optional[dict] = None
    """The stage's settings dict (``stage.settings(cfg)``): what its output depends on."""

    def for_stage(self, stage: Stage) -> StageContext:
        options = getattr(self.cfg, stage.section) if stage.section else None
        return replace(self, stage=stage, options=options, settings=stage.function("settings")(self.cfg))


BUILTIN: tuple[Stage, ...] = (
    Stage("personas", (), ".bootstrap.personas", ("personas.jsonl",), ("personas",), section="persona", check="check"),
    Stage(
        "queries",
        ("personas",),
        ".bootstrap.queries",
        (
            "queries.jsonl",
            "query_rounds.jsonl",
            "query_rounds.meta.json",
            "query_topics.jsonl",
            "query_topics.meta.json",
        ),
        ("queries", "query_rounds", "query_topics"),
        section="queries",
        check="check",
    ),
    Stage(
        "answers",
        ("queries",),
        ".bootstrap.answers",
        ("answers.jsonl",),
        ("answers",),
        section="answers",
        check="check",
    ),
    Stage(
        "verdicts",
        ("answers",),
        ".bootstrap.verify",
        ("verdicts.jsonl", "bootstrap.done.json", "summary.json", "summary.md"),
        ("verdicts",),
        marker="bootstrap",
        section="judge",
    ),
    Stage.training("gate", ("verdicts",), ".train.gate", section="gate", check="check"),
    Stage.training("distill", ("verdicts",), ".train.distill", section="distill", prepare="prepare"),
)

STAGES: tuple[Stage, ...] = BUILTIN
"""The registry, in pipeline order: the built-in stages and the registered ones (read it through
this module, ``stages.STAGES``, or the functions below: :func:`register` rebinds it)."""


def register(stage: Stage, after: Optional[str] = None) -> Stage:
    """Add ``stage`` to the registry, after the stage ``after`` (default: at the end); returns it.

    Adding a stage = one module (its ``settings(cfg)`` and ``step(ctx)``) + one call, e.g.
    ``stages.register(Stage.training("probe", ("verdicts",), "mypkg.probe"))``. Registering a stage
    of the same name again replaces it (a module imported twice). A dependency must come earlier."""
    global STAGES
    rest = [s for s in STAGES if s.name != stage.name]
    names = [s.name for s in rest]
    if after is not None and after not in names:
        raise ValueError(f"stage {stage.name!r}: no stage {after!r} to follow (stages: {', '.join(names)})")
    at = names.index(after) + 1 if after is not None else len(rest)
    missing = [d for d in stage.depends_on if d not in names[:at]]
    if missing:
        raise ValueError(f"stage {stage.name!r} depends on {', '.join(missing)}, which must come before it")
    if stage.kind not in (BOOTSTRAP, TRAINING):
        raise ValueError(f"stage {stage.name!r}: kind is {BOOTSTRAP!r} or {TRAINING!r}, not {stage.kind!r}")
    STAGES = tuple(rest[:at]) + (stage,) + tuple(rest[at:])
    return stage


def load_plugins() -> list[str]:
    """Import the stage modules of the installed packages: each ``prism_persona.stages`` entry point names
    a module whose import calls :func:`register` (the `prism` CLI calls this before it builds its parser,
    so ``--redo`` knows them). Returns the entry names; a module that fails to import is a one-line error
    (:mod:`prism_persona.plugins`)."""
    from .plugins import STAGE_GROUP, load_group

    return [name for name, _ in load_group(STAGE_GROUP)]


def unregister(name: str) -> None:
    """Remove a registered (not a built-in) stage: for tests and plug-ins that undo their registration."""
    global STAGES
    if any(s.name == name for s in BUILTIN):
        raise ValueError(f"{name!r} is a built-in stage")
    STAGES = tuple(s for s in STAGES if s.name != name)


def all_stages() -> tuple[Stage, ...]:
    return STAGES


def stage_names() -> list[str]:
    return [s.name for s in STAGES]


def get_stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(name)


def bootstrap_stages() -> tuple[str, ...]:
    """The stages that write records with the run's engine and judge, in order."""
    return tuple(s.name for s in STAGES if s.kind == BOOTSTRAP)


def training_stages() -> tuple[str, ...]:
    """The stages that train on the labelled data, in order."""
    return tuple(s.name for s in STAGES if s.kind == TRAINING)


def markers() -> tuple[str, ...]:
    """The done markers of a whole run, in order."""
    return tuple(s.marker for s in STAGES if s.marker)


def with_dependents(name: str) -> list[str]:
    """``name`` and every stage that depends on it, directly or not, in pipeline order."""
    out = {name}
    for s in STAGES:  # in order, so a dependency is always seen before its dependents
        if out.intersection(s.depends_on):
            out.add(s.name)
    return [s.name for s in STAGES if s.name in out]


def store_stage(store: str) -> str:
    """The stage a JSONL store belongs to (``query_rounds`` -> ``queries``); other names unchanged."""
    return next((s.name for s in STAGES if store in s.stores), store)
