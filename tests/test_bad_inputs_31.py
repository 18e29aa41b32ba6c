"""Issue 31: nothing lost (a failed command leaves the run byte-identical), nothing outside (a run never
writes through a link that leaves it), no silent non-finite model, every input bounded where it enters."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from prism_persona import cli
from prism_persona.testing import one_error_line, small_run_overrides

DOMAINS = ["writing", "coding"]


@pytest.fixture(autouse=True)
def _log_to_this_tests_stderr():
    cli.setup_logging(quiet=True)  # an earlier test's cli.main bound logging to its own (closed) stderr


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    """A whole finished run (bootstrap, gate, distill, artifact) of the scripted engine; copy before use."""
    import prism_persona.engines as E
    from prism_persona import config as C
    from prism_persona.testing import BootstrapEngine
    from prism_persona.train.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("finished31") / "run"
    real = E.make_engine
    E.make_engine = lambda cfg, model=None, tokenizer=None: BootstrapEngine()
    try:
        run_pipeline(C.resolve("tiny", overrides=small_run_overrides(tiny_model_dir, out, DOMAINS)))
    finally:
        E.make_engine = real
    assert (out / "prism" / "prism_config.json").is_file()
    return out


def copy_run(finished_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out, symlinks=True)
    saved = json.loads((out / "config.json").read_text())
    saved["out"] = str(out)
    (out / "config.json").write_text(json.dumps(saved, indent=2))
    return out


def tree_hash(root: Path) -> dict[str, str]:
    """Every file, directory and link under ``root`` with a hash of its bytes (or its link target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# --------------------------------------------------------------------------------------------------
# 1. a command validates everything before it deletes anything; a failed --redo is rolled back


def garble_verdicts(run: Path) -> None:
    lines = (run / "verdicts.jsonl").read_text().splitlines(keepends=True)
    (run / "verdicts.jsonl").write_text(lines[0] + "{not json\n" + "".join(lines[1:]))


REDO_CASES = {
    "run_redo_verdicts_unknown_judge": (None, ["run", "--out", "{R}", "--redo", "verdicts", "--judge", "nosuch:judge"]),
    "run_redo_answers_unknown_judge": (None, ["run", "--out", "{R}", "--redo", "answers", "--judge", "nosuch:judge"]),
    "bootstrap_redo_verdicts_unknown_judge": (
        None,
        ["bootstrap", "--out", "{R}", "--redo", "verdicts", "--judge", "nosuch_mod_31:judge"],
    ),
    "gate_redo_garbled_verdicts": (garble_verdicts, ["gate", "--run", "{R}", "--redo"]),
    "distill_redo_garbled_verdicts": (garble_verdicts, ["distill", "--run", "{R}", "--redo"]),
    "run_redo_gate_garbled_verdicts": (garble_verdicts, ["run", "--out", "{R}", "--redo", "gate"]),
    "distill_redo_no_such_module": (
        None,
        ["distill", "--run", "{R}", "--redo", "--set", 'distill.target_modules=["nonexistent"]'],
    ),
    "run_redo_distill_no_such_module": (
        None,
        ["run", "--out", "{R}", "--redo", "distill", "--set", 'distill.target_modules=["nonexistent"]'],
    ),
    "run_redo_gate_no_such_module": (
        None,
        ["run", "--out", "{R}", "--redo", "gate", "--set", 'distill.target_modules=["nonexistent"]'],
    ),
}


@pytest.mark.parametrize("case", sorted(REDO_CASES))
def test_1_a_failed_redo_leaves_the_run_byte_identical(case, finished_run, tmp_path, scripted, capsys):
    prepare, argv = REDO_CASES[case]
    run = copy_run(finished_run, tmp_path)
    if prepare:
        prepare(run)
    before = tree_hash(run)
    rc = cli.main([a.format(R=run) for a in argv] + ["-q"])
    line = one_error_line(capsys)
    assert rc == 2, line
    after = tree_hash(run)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert changed == [], changed


def test_1_a_redo_that_fails_half_way_is_rolled_back(finished_run, tmp_path, scripted, monkeypatch, capsys):
    """The judge passes every check, then fails on the 3rd pair: the new verdicts, the removed gate,
    adapter and artifact, config.json - all as they were."""
    import prism_persona.testing as T
    from prism_persona.errors import PrismError

    run = copy_run(finished_run, tmp_path)
    before = tree_hash(run)
    calls = {"n": 0}
    real = T.BootstrapEngine.generate

    def fails_later(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 2:
            raise PrismError("the judge server went away")
        return real(self, *a, **k)

    monkeypatch.setattr(T.BootstrapEngine, "generate", fails_later)
    rc = cli.main(["run", "--out", str(run), "--redo", "answers", "-q"])
    assert rc == 2 and "went away" in one_error_line(capsys)
    assert calls["n"] > 2  # it got past the checks and did work
    assert tree_hash(run) == before


def test_1_an_interrupted_redo_is_carried_on_by_the_next_command(finished_run, tmp_path, scripted, monkeypatch):
    import prism_persona.train.gate as G
    from prism_persona.store import SWAP_DIR

    run = copy_run(finished_run, tmp_path)
    old_gate = (run / "gate" / "gate.safetensors").read_bytes()
    real = G.run_gate

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(G, "run_gate", interrupted)
    assert cli.main(["gate", "--run", str(run), "--redo", "--set", "gate.epochs=3", "-q"]) == 130
    assert (run / SWAP_DIR / "gate" / "gate.safetensors").read_bytes() == old_gate  # kept aside
    assert not (run / "gate").exists() and not (run / "prism").exists()
    monkeypatch.setattr(G, "run_gate", real)
    assert cli.main(["gate", "--run", str(run), "--set", "gate.epochs=3", "-q"]) == 0
    assert not (run / SWAP_DIR).exists()
    assert json.loads((run / "gate.meta.json").read_text())["settings"]["gate"]["epochs"] == 3
    assert (run / "prism" / "gate_config.json").is_file()
