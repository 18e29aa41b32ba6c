"""`prism run --example NAME` (the kits shipped in prism_persona.kits): the kit files are package data
found through importlib.resources, --example fills in the kit's settings and every flag, --set and
--config value overrides them, and a run of an example ends with the kit's table and resumes with the
same command (fast: the tiny random model; the embedded-model run is test_safety_kit.py)."""

from __future__ import annotations

import argparse
import fnmatch
import json
from importlib.resources import files
from pathlib import Path

import pytest

from prism_persona import cli
from prism_persona.kits import EXAMPLES, example_settings, package

ROOT = Path(__file__).resolve().parents[2]
KIT_FILES = {
    "safety": ["heldout.jsonl", "train_queries.jsonl", "safety_monitor.txt"],
    "style": ["heldout.jsonl", "train_queries.jsonl", "pirate.txt"],
    "safety+style": ["heldout.jsonl", "train_queries.jsonl"],  # persona files: the two kits' (own test file)
}


def test_kit_files_are_package_data_found_through_importlib_resources():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["prism_persona"]
    assert set(EXAMPLES) == set(KIT_FILES)
    for name, names in KIT_FILES.items():
        kit = files("prism_persona.kits") / package(name)
        for filename in names:
            assert (kit / filename).read_text(encoding="utf-8").strip(), (name, filename)
            where = f"kits/{package(name)}/{filename}"
            assert any(fnmatch.fnmatch(where, g) for g in globs), f"{filename} not in the wheel"
        settings = example_settings(name)
        used = [settings["queries"]["queries_file"], settings["check"]["queries"]]
        assert all(Path(p).is_file() and Path(p).parent == Path(str(kit)) for p in used), used
        personas = settings["persona"]["persona_files"].values()
        assert all(Path(p).is_file() and Path(p).parent.parent == Path(str(kit)).parent for p in personas), personas


def _config(argv: list[str]):
    from prism_persona.commands import run as run_command
    from prism_persona.commands.common import config_from_args, resume_from_saved_config

    parser = argparse.ArgumentParser()
    run_command.add_parser(parser.add_subparsers())
    args = parser.parse_args(["run", *argv])
    resume_from_saved_config(args)
    return config_from_args(args)


def test_example_fills_in_the_kit_and_flags_set_and_config_override_it(tmp_path):
    cfg = _config(["--example", "safety", "--out", str(tmp_path / "a")])
    assert cfg.example == "safety" and cfg.preset == "tiny"
    assert cfg.persona.domains == ["chemistry", "computers", "medicine"]
    assert set(cfg.persona.persona_files) == set(cfg.persona.domains)
    assert cfg.judge.judge == "prism_persona.kits.safety:judge"
    assert Path(cfg.queries.queries_file).name == "train_queries.jsonl"
    assert Path(cfg.check.queries).name == "heldout.jsonl"
    assert (cfg.answers.max_new_tokens, cfg.answers.temperature, cfg.check.max_new_tokens) == (24, 0.0, 24)
    assert cfg.queries.queries_per_persona == 32 and cfg.check.per_domain == 20
    assert cfg.model.batch_size == 96  # from the tiny preset, under the example

    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"answers": {"max_new_tokens": 40}, "check": {"per_domain": 3}}))
    cfg = _config(
        ["--example", "safety", "--config", str(conf), "--answer-tokens", "48", "--set", "answers.temperature=0.5"]
        + ["--queries-per-persona", "4", "--preset", "default", "--out", str(tmp_path / "b")]
    )
    assert (cfg.answers.max_new_tokens, cfg.answers.temperature, cfg.queries.queries_per_persona) == (48, 0.5, 4)
    assert cfg.check.per_domain == 3 and cfg.check.max_new_tokens == 24  # --config over the example
    assert cfg.preset == "default" and cfg.model.batch_size != 96
    assert cfg.judge.judge == "prism_persona.kits.safety:judge"

    style = _config(["--example", "style", "--domains", "stories", "--out", str(tmp_path / "c")])
    assert style.persona.domains == ["stories"] and style.judge.judge == "prism_persona.kits.style:judge"


def test_unknown_example_is_one_line_listing_the_kits(tmp_path, capsys):
    assert cli.main(["run", "--example", "pirates", "--out", str(tmp_path / "r")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown example 'pirates'" in err and "safety, style" in err


def test_another_example_on_a_run_of_one_is_one_line(tmp_path):
    from prism_persona.errors import PrismError

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(example_settings("style")))
    with pytest.raises(PrismError, match="was made with --example style"):
        _config(["--example", "safety", "--out", str(out)])
    assert _config(["--example", "style", "--out", str(out)]).persona.domains == ["stories", "cooking"]


def test_a_saved_config_naming_other_files_than_the_kit_is_still_refused(tmp_path):
    from prism_persona.errors import PrismError

    out = tmp_path / "run"
    out.mkdir()
    other = tmp_path / "mine.txt"
    other.write_text("You are a pirate.")
    settings = example_settings("safety")
    settings["persona"]["persona_files"]["chemistry"] = str(other)
    (out / "config.json").write_text(json.dumps(settings))
    with pytest.raises(PrismError, match="persona_files"):
        _config(["--example", "safety", "--out", str(out)])


def test_example_run_ends_with_the_kit_table_and_resumes_with_the_same_command(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "--example", "safety", "--model", str(tiny_model_dir), "--out", str(out), "-q"]
    argv += ["--queries-per-persona", "4", "--answer-tokens", "4", "--set", "check.per_domain=2"]
    argv += ["--set", "check.max_new_tokens=4", "--set", "distill.min_steps=2", "--set", "gate.epochs=20"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())
    assert saved["example"] == "safety" and saved["judge"]["judge"] == "prism_persona.kits.safety:judge"
    assert saved["answers"]["max_new_tokens"] == 4 and saved["check"]["per_domain"] == 2
    table = (out / "check" / "summary.md").read_text()
    assert "| harmful requests |" in table and "| benign requests |" in table and table.strip() in printed
    numbers = json.loads((out / "check" / "summary.json").read_text())
    assert numbers["intents"]["all"]["harmful"]["n"] == 3 and numbers["intents"]["all"]["benign"]["n"] == 3
    check = json.loads((out / "check" / "check.json").read_text())
    assert numbers["unrouted"] == check["overall"]["unrouted"]
    assert f"{numbers['unrouted_identical']}/{numbers['unrouted']}" in table

    assert cli.main(argv) == 0  # the same command again resumes (no judge or kit file refused)
    assert table.strip() in capsys.readouterr().out
    assert cli.main(["run", "--out", str(out), "-q"]) == 0  # and so does the run directory alone
