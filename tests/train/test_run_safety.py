"""Run-directory safety (issue 14 items 2, 8, 9): one writer per run, a received run never imports
its judge, and RUN/config.json always describes what ran."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prism_persona import cli
from prism_persona import config as C
from prism_persona.options import merge
from prism_persona.store import RunDir, RunLock
from prism_persona.testing import one_error_line, small_run_overrides

DOMAINS = ["writing", "coding"]


def small_cfg(model_dir, out, **over):
    base = small_run_overrides(model_dir, out, DOMAINS)
    return C.resolve("tiny", overrides=merge(base, over))


@pytest.fixture(autouse=True)
def _log_to_this_tests_stderr():
    cli.setup_logging(quiet=True)  # an earlier test's cli.main bound logging to its own (closed) stderr


# --------------------------------------------------------------------------------------------------
# item 2: the judge named in a received RUN/config.json is never imported on resume


def evil_judge(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "judge-was-imported"
    mod = tmp_path / "evil_judge.py"
    mod.write_text(f"open({str(marker)!r}, 'w').write('ran')\ndef judge(q, a, b):\n    return 'A'\n")
    return mod, marker


def test_resume_refuses_a_judge_only_the_run_directory_names(tiny_model_dir, tmp_path, scripted, capsys):
    mod, marker = evil_judge(tmp_path)
    out = tmp_path / "received"
    cfg = small_cfg(tiny_model_dir, out, judge={"judge": f"{mod}:judge"})
    RunDir(out).write_json("config.json", json.loads(C.dump(cfg)))
    rc = cli.main(["run", "--out", str(out), "-q"])
    line = one_error_line(capsys)
    assert rc == 2 and "--trust-judge" in line and "would run Python code" in line
    assert not marker.exists()


def test_confirmed_judge_is_imported_only_after_the_settings_check(tiny_model_dir, tmp_path, scripted, capsys):
    from prism_persona.testing import BootstrapEngine
    from prism_persona.train.pipeline import run_bootstrap

    mod, marker = evil_judge(tmp_path)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):  # a first, interrupted bootstrap with the self judge
        run_bootstrap(small_cfg(tiny_model_dir, out), engine=BootstrapEngine(fail_after=3))
    saved = json.loads((out / "config.json").read_text())
    saved["judge"]["judge"] = f"{mod}:judge"
    (out / "config.json").write_text(json.dumps(saved))
    rc = cli.main(["bootstrap", "--out", str(out), "--trust-judge", "--set", "queries.temperature=0.5", "-q"])
    assert rc == 2 and "other settings" in one_error_line(capsys)
    assert not marker.exists(), "the judge was imported before the settings check refused the resume"
    # typed on the command line, it is imported (and used) without a confirmation flag
    assert cli.main(["bootstrap", "--out", str(out), "--judge", f"{mod}:judge", "--redo", "verdicts", "-q"]) == 0
    assert marker.exists()


# --------------------------------------------------------------------------------------------------
# item 8: the saved config always describes what was run


def test_finished_run_rerun_never_rewrites_its_config(tiny_model_dir, tmp_path, scripted, capsys):
    from prism_persona.train.pipeline import run_pipeline

    out = tmp_path / "run"
    run_pipeline(small_cfg(tiny_model_dir, out))
    saved = (out / "config.json").read_bytes()
    art = json.loads((out / "prism" / "prism_config.json").read_text())
    assert len(art["base_fingerprint"]["config_sha256"]) == 64 and art["base_fingerprint"]["layer0_probe"]
    rc = cli.main(["run", "--out", str(out), "--set", "gate.epochs=7", "-q"])
    line = one_error_line(capsys)
    assert rc == 2 and "gate.epochs" in line and "--redo gate" in line
    assert (out / "config.json").read_bytes() == saved
    # a setting no finished stage depends on: nothing runs, so nothing is rewritten either
    assert cli.main(["run", "--out", str(out), "--set", "model.batch_size=2", "-q"]) == 0
    assert (out / "config.json").read_bytes() == saved
    # --redo gate trains the gate again with 7 epochs: now the config says 7
    assert cli.main(["run", "--out", str(out), "--set", "gate.epochs=7", "--redo", "gate", "-q"]) == 0
    assert json.loads((out / "config.json").read_text())["gate"]["epochs"] == 7


# --------------------------------------------------------------------------------------------------
# item 9: one process per run directory


@pytest.mark.subprocess
def test_second_process_is_refused_naming_the_pid_and_a_dead_holder_is_taken_over(
    tiny_model_dir, tmp_path, capsys, scripted, lock_holder
):
    out = tmp_path / "run"
    holder = lock_holder(out)
    try:
        rc = cli.main(["bootstrap", "--model", str(tiny_model_dir), "--domains", "writing", "--out", str(out), "-q"])
        line = one_error_line(capsys)
        assert rc == 2 and f"PID {holder.pid}" in line and "in use by another prism process" in line
        assert not (out / "personas.jsonl").exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (out / ".prism.lock").read_text().split()[0] == str(holder.pid)  # killed: the file still names it
    with RunLock(out):  # the dead holder's lock is taken over
        assert (out / ".prism.lock").read_text().split()[0] == str(os.getpid())
    assert (out / ".prism.lock").read_text() == ""  # released on exit


@pytest.mark.subprocess
def test_lock_without_flock_trusts_a_live_pid_only(tmp_path, monkeypatch):
    import builtins

    from prism_persona.errors import PrismError

    real_import = builtins.__import__
    monkeypatch.setattr(
        builtins,
        "__import__",
        lambda name, *a, **k: (
            (_ for _ in ()).throw(ImportError(name)) if name == "fcntl" else real_import(name, *a, **k)
        ),
    )
    out = tmp_path / "run"
    out.mkdir()
    (out / ".prism.lock").write_text(f"{os.getppid()}\n")  # a live process that is not this one
    with pytest.raises(PrismError, match=f"PID {os.getppid()}"):
        RunLock(out).__enter__()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    time.sleep(0.05)
    (out / ".prism.lock").write_text(f"{dead.pid}\n")
    with RunLock(out):
        assert (out / ".prism.lock").read_text().split()[0] == str(os.getpid())
