"""The stages of a run, in order: the one list of their names, what each depends on and where it lives.

``--redo`` choices, what ``--redo`` removes, the settings checked before a run resumes, the done
markers and the training stages the pipeline dispatches are all read from :data:`STAGES`. Standard
library only (``prism --help`` reads it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    """The ``--redo`` name; the records of a bootstrap stage are ``RUN/<name>.jsonl``."""
    depends_on: tuple[str, ...]
    """Stages whose output this one reads: redoing one of them redoes this one too."""
    module: str
    """Where it runs, relative to ``prism_persona``."""
    files: tuple[str, ...]
    """What ``--redo`` removes (files and directories in the run directory)."""
    stores: tuple[str, ...] = ()
    """The JSONL stores whose settings are checked before a run resumes (bootstrap stages)."""
    marker: str = ""
    """The ``<marker>.done.json`` written when the stage (and the ones it ends) is done."""
    run: str = ""
    """A training stage's ``run(run_dir, cfg, records, model, tokenizer)`` function in ``module``."""
    settings: str = ""
    """The stage's ``settings(cfg) -> dict`` function in ``module``: everything its output depends on,
    upstream stages included (a bootstrap stage's records are checked against it before a run resumes,
    a finished training stage before it is skipped). Each stage module owns its settings."""

    @classmethod
    def training(cls, name: str, depends_on: tuple[str, ...], module: str) -> Stage:
        """A stage that trains on the labelled data: ``run_<name>`` and ``<name>_settings`` in ``module``,
        files in ``RUN/<name>/``, done marker ``<name>.done.json``."""
        files = (f"{name}.done.json", name)
        return cls(name, depends_on, module, files, marker=name, run=f"run_{name}", settings=f"{name}_settings")


STAGES: tuple[Stage, ...] = (
    Stage("personas", (), "bootstrap.personas", ("personas.jsonl",), ("personas",), settings="personas_settings"),
    Stage(
        "queries",
        ("personas",),
        "bootstrap.queries",
        (
            "queries.jsonl",
            "query_rounds.jsonl",
            "query_rounds.meta.json",
            "query_topics.jsonl",
            "query_topics.meta.json",
        ),
        ("queries", "query_rounds", "query_topics"),
        settings="queries_settings",
    ),
    Stage("answers", ("queries",), "bootstrap.answers", ("answers.jsonl",), ("answers",), settings="answers_settings"),
    Stage(
        "verdicts",
        ("answers",),
        "bootstrap.verify",
        ("verdicts.jsonl", "bootstrap.done.json", "summary.json", "summary.md"),
        ("verdicts",),
        marker="bootstrap",
        settings="verdicts_settings",
    ),
    Stage.training("gate", ("verdicts",), "train.gate"),
    Stage.training("distill", ("verdicts",), "train.distill"),
)


def stage_names() -> list[str]:
    return [s.name for s in STAGES]


def get_stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(name)


def training_stages() -> tuple[str, ...]:
    """The stages that train on the labelled data (they have a ``run`` function), in order."""
    return tuple(s.name for s in STAGES if s.run)


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
