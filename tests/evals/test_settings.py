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


def _module(tmp_path, monkeypatch, name: str, body: str) -> None:
    (tmp_path / f"{name}.py").write_text(body, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["eval", "--judge", "mygrader:grade"], "--judge takes a model (self, a model id or a path)"),
        (["study", "--judge", "Qwen/Qwen2.5-7B-Instruct", "--grader", "mygrader:grade"], "give one"),
        (["eval", "--persona-file", "writing"], "--persona-file wants DOMAIN=PATH, got 'writing'"),
        (["eval", "--persona-file", "writing=/no/such/file.txt"], "persona file not found: /no/such/file.txt"),
    ],
)
def test_each_flag_keeps_one_contract(argv, msg, capsys):
    assert main(argv + ["-q"]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1


def test_a_pairwise_judge_given_as_grader_is_one_line(tmp_path, monkeypatch):
    from prism_persona.errors import PrismError
    from prism_persona.judges import load_grader

    _module(tmp_path, monkeypatch, "pairjudge", "def judge(query, a, b):\n    return 'A'\n")
    _module(tmp_path, monkeypatch, "okgrader", "def grade(prompt, **kw):\n    return '[[5]]'\n")
    with pytest.raises(PrismError, match=r"wants fn\(prompt\) -> reply text, this one takes 3 required"):
        load_grader("pairjudge:judge")
    assert load_grader("okgrader:grade")("x") == "[[5]]"


def test_persona_file_is_domain_equals_path_and_persona_json_all_domains(tmp_path):
    from prism_persona.evals.build import build_personas

    (tmp_path / "law.txt").write_text("You are a judge.\n", encoding="utf-8")
    (tmp_path / "all.json").write_text('{"law": "You are a clerk.", "math": "You are a mathematician."}')
    p = argparse.ArgumentParser()
    add_eval_options(p)
    cfg = eval_config(
        p.parse_args(["--persona-json", str(tmp_path / "all.json"), "--persona-file", f"law={tmp_path / 'law.txt'}"])
    )
    assert cfg.persona_files == {"law": str((tmp_path / "law.txt").resolve())}
    book = build_personas(cfg)
    assert book.personas["law"] == {"min": "You are a judge.", "short": "You are a judge.", "long": "You are a judge."}
    assert book.personas["math"]["short"] == "You are a mathematician."
