"""EvalConfig: the one place eval/study defaults live; flags derived from it, bad values are one line."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from prism_persona.cli import main
from prism_persona.evals.build import add_eval_options, eval_config
from prism_persona.evals.settings import EvalConfig


def test_every_setting_has_help_and_a_flag():
    p = argparse.ArgumentParser()
    add_eval_options(p)
    dests = {a.dest for a in p._actions}
    for f in dataclasses.fields(EvalConfig):
        assert f.metadata.get("help"), f.name
        assert f.name in dests, f.name


def test_defaults_come_from_the_dataclass_and_flags_override():
    p = argparse.ArgumentParser()
    add_eval_options(p)
    cfg = eval_config(p.parse_args([]))
    assert cfg == EvalConfig() and cfg.answer_tokens == 512 and cfg.refusal_classifier == "judge"
    cfg = eval_config(p.parse_args(["--limit", "3", "--no-pairwise", "--placement", "user"]))
    assert (cfg.limit, cfg.no_pairwise, cfg.placement) == (3, True, "user")


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["eval", "--limit", "0"], "--limit must be at least 1, got 0"),
        (["study", "--answer-tokens", "0"], "--answer-tokens must be at least 1, got 0"),
    ],
)
def test_bad_values_are_one_line(argv, msg, capsys):
    assert main(argv + ["-q"]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1
