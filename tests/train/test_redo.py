"""--redo STAGE re-runs a finished stage with new settings; without it, changed settings of a finished
stage are refused and RUN/config.json keeps describing what was run."""

from __future__ import annotations

import json

import pytest

from prism_persona import config as C
from prism_persona.errors import ConfigMismatchError
from prism_persona.options import merge
from prism_persona.testing import BootstrapEngine
from prism_persona.train.pipeline import redo, run_pipeline


def _cfg(model_dir, out, **over):
    base = {
        "out": str(out),
        "quiet": True,
        "model": {"model": str(model_dir), "batch_size": 4},
        "persona": {"domains": ["writing", "coding"]},
        "queries": {"queries_per_persona": 4, "per_request": 4},
        "gate": {"epochs": 30},
        "distill": {"epochs": 1, "r": 4},
    }
    return C.resolve("tiny", overrides=merge(base, over))


def _saved(out):
    return json.loads((out / "config.json").read_text())


def test_changed_settings_of_a_finished_stage_are_refused_then_redone(tiny_model_dir, tmp_path, monkeypatch):
    import prism_persona.train.distill as D

    out = tmp_path / "run"
    res = run_pipeline(_cfg(tiny_model_dir, out), engine=BootstrapEngine())
    assert res["artifact"] is not None and _saved(out)["gate"]["epochs"] == 30

    changed = _cfg(tiny_model_dir, out, gate={"epochs": 7})
    with pytest.raises(ConfigMismatchError, match="--redo gate") as info:
        run_pipeline(changed, engine=BootstrapEngine())
    assert "\n" not in str(info.value)
    assert _saved(out)["gate"]["epochs"] == 30  # the saved config still describes what ran

    removed = redo(out, "gate")
    assert {"gate.done.json", "gate", "gate.meta.json", "prism"} <= set(removed)
    assert (out / "distill.done.json").exists() and (out / "answers.jsonl").exists()
    monkeypatch.setattr(D, "distill_loss", lambda *a, **k: pytest.fail("distillation redone"))
    res = run_pipeline(changed, engine=BootstrapEngine())
    assert res["artifact"] is not None and (out / "prism" / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "gate.meta.json").read_text())["settings"]["gate"]["epochs"] == 7
    assert _saved(out)["gate"]["epochs"] == 7


def test_redo_a_bootstrap_stage_redoes_what_depends_on_it(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    run_pipeline(_cfg(tiny_model_dir, out), engine=BootstrapEngine())
    queries_before = (out / "queries.jsonl").read_text()
    removed = redo(out, "answers")
    for name in ("answers.jsonl", "verdicts.jsonl", "bootstrap.done.json", "gate", "distill", "prism"):
        assert name in removed and not (out / name).exists(), name
    assert (out / "personas.jsonl").exists() and (out / "queries.jsonl").read_text() == queries_before
    changed = _cfg(tiny_model_dir, out, answers={"max_new_tokens": 17})
    assert run_pipeline(changed, engine=BootstrapEngine())["artifact"] is not None
    assert json.loads((out / "answers.meta.json").read_text())["settings"]["answers"]["max_new_tokens"] == 17
    assert (out / "queries.jsonl").read_text() == queries_before  # upstream untouched


def test_cli_redo_flag(tiny_model_dir, tmp_path, capsys):
    from prism_persona.cli import main

    out = tmp_path / "run"
    run_pipeline(_cfg(tiny_model_dir, out), engine=BootstrapEngine())
    capsys.readouterr()
    rc = main(["gate", "--run", str(out), "--set", "gate.epochs=5", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--redo gate" in err[0]
    assert main(["gate", "--run", str(out), "--set", "gate.epochs=5", "--redo", "-q"]) == 0
    assert json.loads((out / "gate.meta.json").read_text())["settings"]["gate"]["epochs"] == 5
    assert (out / "prism" / "gate_config.json").is_file()  # re-assembled with the new gate
