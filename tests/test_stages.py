"""The one registry of stages (prism_persona.stages) and what is read from it."""

from __future__ import annotations

import importlib

import pytest

from prism_persona import stages as S
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


def test_every_stage_module_and_training_function_exists():
    for stage in S.STAGES:
        module = importlib.import_module(f"prism_persona.{stage.module}")
        for fn in (stage.run, stage.settings):
            assert not fn or callable(getattr(module, fn))


def test_the_redo_flag_offers_the_registry(capsys):
    from prism_persona.cli import main

    assert main(["run", "--redo", "nonsense"]) == 2  # argparse's usage error, as one line (issue 20)
    err = capsys.readouterr().err.replace("'", "")
    assert "choose from personas, queries, answers, verdicts, gate, distill" in err and len(err.splitlines()) == 1
