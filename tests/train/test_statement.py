"""The last line of a run: what the artifact does, in plain words."""

from prism_persona.bootstrap.summary import judge_diagnostics
from prism_persona.testing import blind_verdicts, seeing_verdicts
from prism_persona.train.report import artifact_statement


def test_the_last_line_says_the_artifact_is_the_base_model_when_the_judge_is_blind():
    summary = {"judge_diagnostics": judge_diagnostics(blind_verdicts(12)), "total": {"wins": 0}}
    gate = {"metrics": {"train": {"n": 9, "routing_rate": 0.0}, "heldout": {"n": 3, "routing_rate": 0.0}}}
    line = artifact_statement(summary, gate, {"examples": 0})
    assert line.startswith("The artifact is exactly the base model") and "could not tell the answers apart" in line


def test_the_last_line_says_what_a_working_artifact_routes():
    summary = {"judge_diagnostics": judge_diagnostics(seeing_verdicts(12)), "total": {"wins": 6}}
    gate = {"metrics": {"train": {"n": 8, "routing_rate": 0.5}, "heldout": {"n": 4, "routing_rate": 0.25}}}
    line = artifact_statement(summary, gate, {"examples": 6})
    assert "routes 42% of the training queries" in line and "6 persona-won answers" in line
