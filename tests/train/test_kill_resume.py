"""kill -9 at a point of every stage of `run_pipeline`, then the same call again: every file ends up
exactly once, as an uninterrupted run writes it (issue 14, the probe's kill test, compact)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.subprocess

SRC = str(Path(__file__).resolve().parents[2] / "src")

DRIVER = r"""
import os, shutil, signal, sys
sys.path.insert(0, SRC)
import torch
torch.set_num_threads(1)
from prism_persona import config as C
import prism_persona.engines as E
import prism_persona.gated.artifact as A
from prism_persona.store import RunDir
from prism_persona.testing import BootstrapEngine

kind, _, arg = KILL_AT.partition(":")

def die():
    os.kill(os.getpid(), signal.SIGKILL)

class Killer(BootstrapEngine):
    def generate(self, chats, params, desc=""):
        if kind == "gen" and self.n_generate >= int(arg):
            die()
        return super().generate(chats, params, desc)

E.make_engine = lambda cfg, model=None, tokenizer=None: Killer()
real_mark = RunDir.mark_done
if kind == "done":  # after the stage's work, before its marker: the most exposed moment
    RunDir.mark_done = lambda self, stage, info=None: die() if stage == arg else real_mark(self, stage, info)
if kind == "pdone":  # one persona's distillation done, before its marker (RUN/distill/personas/<arg>)
    RunDir.mark_done = lambda self, stage, info=None: (
        die() if stage == "distill" and self.root.name == arg else real_mark(self, stage, info))
if kind == "assemble":  # half-way through writing the artifact
    real_copy = shutil.copytree
    def copy_and_die(*a, **k):
        real_copy(*a, **k)
        die()
    A.shutil.copytree = copy_and_die
if kind == "step":  # inside distillation, after some optimiser steps
    real_step = torch.optim.AdamW.step
    count = {"n": 0}
    def step(self, *a, **k):
        count["n"] += 1
        if count["n"] > int(arg) and any(p.requires_grad and p.dim() == 2 and p.shape[0] <= 8
                                         for g in self.param_groups for p in g["params"]):
            die()
        return real_step(self, *a, **k)
    torch.optim.AdamW.step = step
from prism_persona.train.pipeline import run_pipeline
run_pipeline(C.resolve("tiny", overrides=OVERRIDES))
"""


def overrides(model_dir, out, classes: str = "binary") -> dict:
    return {
        "out": str(out),
        "quiet": True,
        "persona": {"domains": ["writing", "coding"]},
        "model": {"model": str(model_dir), "batch_size": 4},
        "queries": {"queries_per_persona": 4, "per_request": 4},
        "gate": {"epochs": 20, "classes": classes},
        "distill": {"epochs": 2, "r": 4, "max_length": 160, "batch_size": 2},
    }


def run_killed(model_dir, out, kill_at: str, classes: str = "binary") -> int:
    code = (
        DRIVER.replace("SRC", repr(SRC))
        .replace("KILL_AT", repr(kill_at))
        .replace("OVERRIDES", repr(overrides(model_dir, out, classes)))
    )
    env = {
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PRISM_QUIET": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
        "PATH": "/usr/bin:/bin",
    }
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr[-3000:]
    return proc.returncode


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


JSONL = (
    "personas.jsonl",
    "queries.jsonl",
    "query_rounds.jsonl",
    "query_topics.jsonl",
    "answers.jsonl",
    "verdicts.jsonl",
    "gate/predictions.jsonl",
    "distill/loss.jsonl",
)


def test_kill_9_at_every_stage_then_resume_is_exactly_once(tiny_model_dir, tmp_path, monkeypatch):
    import prism_persona.engines as E
    from prism_persona import config as C
    from prism_persona.gated.artifact import Artifact
    from prism_persona.testing import BootstrapEngine
    from prism_persona.train.pipeline import run_pipeline

    monkeypatch.setattr(E, "make_engine", lambda cfg, model=None, tokenizer=None: BootstrapEngine())
    ref = tmp_path / "reference"
    run_pipeline(C.resolve("tiny", overrides=overrides(tiny_model_dir, ref)))

    out = tmp_path / "killed"
    kills = ["gen:1", "gen:3", "done:bootstrap", "done:gate", "step:1", "done:distill", "assemble"]
    for kill_at in kills:
        assert run_killed(tiny_model_dir, out, kill_at) == -signal.SIGKILL, f"{kill_at} did not kill"
    assert run_killed(tiny_model_dir, out, "none:") == 0

    for name in JSONL:
        if not (ref / name).exists():
            continue
        got, want = records(out / name), records(ref / name)
        keys = [r.get("key", r.get("step")) for r in got]
        assert len(keys) == len(set(keys)), f"{name}: a record was written twice"
        assert sorted(keys, key=str) == sorted((r.get("key", r.get("step")) for r in want), key=str), name
    for name in ("personas.jsonl", "queries.jsonl", "answers.jsonl", "verdicts.jsonl"):
        assert records(out / name) == records(ref / name) or sorted(map(json.dumps, records(out / name))) == sorted(
            map(json.dumps, records(ref / name))
        ), name
    for stage in ("bootstrap", "gate", "distill"):
        assert (out / f"{stage}.done.json").is_file()
    art = Artifact.read(out / "prism")
    assert art.config["base_fingerprint"] == Artifact.read(ref / "prism").config["base_fingerprint"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".prism.") and p.name != ".prism.lock"]
    assert (out / ".prism.lock").read_text() == ""


def test_kill_9_between_and_inside_the_personas_distillations_resumes_each_once(tiny_model_dir, tmp_path, monkeypatch):
    """gate.classes = personas with two generated personas: one adapter each. kill -9 after the gate's
    work, after the first persona's distillation (before its marker), after the second's, before the
    stage's marker and while assembling; the resumed run ends with both adapters, each persona's loss
    curve written exactly once, and the K-way gate naming the adapters in order."""
    import prism_persona.engines as E
    from prism_persona import config as C
    from prism_persona.gated.artifact import Artifact
    from prism_persona.testing import BootstrapEngine
    from prism_persona.train.pipeline import run_pipeline

    monkeypatch.setattr(E, "make_engine", lambda cfg, model=None, tokenizer=None: BootstrapEngine())
    ref = tmp_path / "reference"
    run_pipeline(C.resolve("tiny", overrides=overrides(tiny_model_dir, ref, "personas")))
    names = [p["name"] for p in json.loads((ref / "distill" / "personas.json").read_text())["personas"]]
    assert names == ["writing", "coding"], "the fixture must give two personas that both won"

    out = tmp_path / "killed"
    # (no "step:" kill here: the tiny fixture's answers leave the distillation no example, so no step runs)
    kills = ["done:gate", "pdone:writing", "pdone:coding", "done:distill", "assemble"]
    for kill_at in kills:
        assert run_killed(tiny_model_dir, out, kill_at, "personas") == -signal.SIGKILL, f"{kill_at} did not kill"
    assert run_killed(tiny_model_dir, out, "none:", "personas") == 0
    for name in names:
        curve = f"distill/personas/{name}/distill/loss.jsonl"
        steps = [r["step"] for r in records(out / curve)]
        assert len(steps) == len(set(steps)) and sorted(steps) == sorted(r["step"] for r in records(ref / curve))
        assert (out / f"distill/personas/{name}/distill.done.json").is_file()
    done = json.loads((out / "distill.done.json").read_text())
    assert [p["name"] for p in done["personas"]] == names
    art = Artifact.read(out / "prism")
    assert art.personas == names == art.gate().personas
