"""The one registry of stages (prism_persona.stages) and what is read from it."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from prism_persona import config as C
from prism_persona import stages as S
from prism_persona.bootstrap.common import stage_settings
from prism_persona.errors import PrismError
from prism_persona.train.pipeline import redo_stages


def test_the_stages_in_order_with_their_dependencies():
    assert S.stage_names() == ["personas", "queries", "answers", "verdicts", "gate", "distill"]
    for i, stage in enumerate(S.STAGES):  # a stage depends only on earlier ones
        assert set(stage.depends_on) <= set(S.stage_names()[:i])
    assert S.training_stages() == ("gate", "distill")
    assert S.markers() == ("bootstrap", "gate", "distill")


def test_redo_takes_a_stage_and_everything_after_it_that_reads_it():
    assert redo_stages("queries") == ["queries", "answers", "verdicts", "gate", "distill"]
    assert redo_stages("verdicts") == ["verdicts", "gate", "distill"]
    assert redo_stages("gate") == ["gate"] and redo_stages("distill") == ["distill"]
    with pytest.raises(PrismError, match="--redo takes one of: personas, queries, answers, verdicts, gate, distill"):
        redo_stages("bootstrap")


def test_a_store_is_named_by_its_stage():
    assert S.store_stage("query_rounds") == "queries" and S.store_stage("verdicts") == "verdicts"


def test_every_stage_module_and_function_exists():
    for stage in S.STAGES:
        module = importlib.import_module(stage.module, "prism_persona")
        assert stage.section and hasattr(C.RunConfig(), stage.section)  # every built-in stage owns a block
        for which in ("settings", "step", "check", "prepare"):
            name = getattr(stage, which)
            assert (not name and which in ("check", "prepare")) or callable(getattr(module, name)), (stage, which)
        assert stage.function("step") is getattr(module, "step")


# --- the settings dicts old runs were saved with ---------------------------------------------------

SNAPSHOT = Path(__file__).parent / "fixtures" / "stage_settings_e846ee5.json"
"""Every stage's settings dict on three configs, as main e846ee5 computed them (before the pipeline
looped the registry): a run made then must resume, so these must not change by a byte."""


def snapshot_configs(tmp: Path) -> dict:
    (tmp / "w.txt").write_text("You are a careful writing editor.\n", encoding="utf-8")
    (tmp / "q.jsonl").write_text(
        '{"domain": "writing", "query": "How do I tighten this paragraph?"}\n', encoding="utf-8"
    )
    return {
        "default": C.resolve(overrides={"out": str(tmp / "r"), "persona": {"domains": ["writing", "coding"]}}),
        "tiny_options": C.resolve(
            "tiny",
            overrides={
                "out": str(tmp / "r"),
                "seed": 7,
                "persona": {
                    "domains": ["writing", "coding"],
                    "persona_files": {"writing": str(tmp / "w.txt")},
                    "prefill": "You are",
                    "use_length": "long",
                    "placement": "user",
                },
                "queries": {"format": "shots", "topic_check": True, "max_rounds": 3},
                "answers": {"temperature": 0.3, "samples": 2},
                "judge": {"rule": "margin", "null_pairs": 0, "abstain_margin": 0.25, "mode": "logprob"},
                "gate": {"epochs": 5, "base_queries": "off"},
                "distill": {"r": 4, "epochs": 1},
            },
        ),
        "queries_file": C.resolve(
            "tiny",
            overrides={
                "out": str(tmp / "r"),
                "persona": {"domains": ["writing"]},
                "queries": {"queries_file": str(tmp / "q.jsonl")},
            },
        ),
    }


def test_stage_settings_are_byte_identical_to_the_ones_old_runs_saved(tmp_path):
    expected = json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    for name, cfg in snapshot_configs(tmp_path).items():
        for stage in S.BUILTIN:
            got = json.dumps(stage_settings(cfg, stage.name), default=str)
            assert got == json.dumps(expected[name][stage.name]), (name, stage.name)


def test_the_redo_flag_offers_the_registry(capsys):
    from prism_persona.cli import main

    assert main(["run", "--redo", "nonsense"]) == 2  # argparse's usage error, as one line (issue 20)
    err = capsys.readouterr().err.replace("'", "")
    assert "choose from personas, queries, answers, verdicts, gate, distill" in err and len(err.splitlines()) == 1
