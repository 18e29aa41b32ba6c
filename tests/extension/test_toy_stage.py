"""Adding a stage = one module + one registration line (docs/ARCHITECTURE.md, "Stages").

A temporary package defines a toy training stage -- its settings function and its step -- and
registers it with one ``stages.register(...)`` call, between the gate and distillation. The pipeline
runs it in order on a tiny random model, a rerun resumes past it, ``--redo`` knows it, and a changed
setting of the finished stage is refused like a built-in stage's.
"""

from __future__ import annotations

import importlib
import json
import sys
import textwrap

import pytest

from prism_persona import config as C
from prism_persona import stages as S
from prism_persona.errors import ConfigMismatchError
from prism_persona.options import merge
from prism_persona.testing import BootstrapEngine, small_run_overrides
from prism_persona.train.pipeline import redo, redo_stages, run_pipeline

TOY = '''
"""A toy stage: the mean norm of the labelled queries' layer-0 features, per domain -> RUN/probe/."""

import json

from prism_persona import stages
from prism_persona.gated.features import query_features

CALLS = []
POOLING = "mean"


def probe_settings(cfg) -> dict:
    """What the probe's output depends on."""
    return {"model": cfg.model.model, "seed": cfg.seed, "probe": {"pooling": POOLING}}


def step(ctx) -> None:  # the registry skips it once done and checks its settings first
    run = ctx.run
    CALLS.append(ctx.stage.name)
    queries = [r["query"] for r in ctx.records]
    feats = query_features(ctx.model, ctx.tokenizer, queries, 4, POOLING)
    norms: dict = {}
    for rec, f in zip(ctx.records, feats):
        norms.setdefault(rec["domain"], []).append(float(f.norm()))
    run.path("probe").mkdir(exist_ok=True)
    mean = {d: sum(v) / len(v) for d, v in sorted(norms.items())}
    (run.path("probe") / "norms.json").write_text(json.dumps(mean), encoding="utf-8")
    order = {"gate_done": run.done("gate"), "distill_done": run.done("distill")}
    run.mark_done("probe", {"queries": len(queries), **order})


stages.register(stages.Stage.training("probe", ("verdicts",), __name__), after="gate")
'''


@pytest.fixture
def toy_stage(tmp_path, monkeypatch):
    """The toy package on sys.path, imported (which registers it); the registry restored afterwards."""
    pkg = tmp_path / "toy_stages"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "probe.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(S, "STAGES", S.STAGES)  # restored at teardown: the registration is undone
    try:
        yield importlib.import_module("toy_stages.probe")
    finally:
        for name in ("toy_stages.probe", "toy_stages"):
            sys.modules.pop(name, None)


def _cfg(model_dir, out, **over):
    return C.resolve("tiny", overrides=merge(small_run_overrides(model_dir, out), over))


def test_a_registered_stage_runs_in_order_resumes_and_redoes(toy_stage, tiny_model_dir, tmp_path, monkeypatch):
    import prism_persona.train.distill as D
    import prism_persona.train.gate as G

    assert S.stage_names() == ["personas", "queries", "answers", "verdicts", "gate", "probe", "distill"]
    assert S.training_stages() == ("gate", "probe", "distill") and "probe" in S.markers()
    assert redo_stages("verdicts") == ["verdicts", "gate", "probe", "distill"]

    out = tmp_path / "run"
    res = run_pipeline(_cfg(tiny_model_dir, out), engine=BootstrapEngine())
    assert res["artifact"] is not None and toy_stage.CALLS == ["probe"]
    done = json.loads((out / "probe.done.json").read_text())
    assert done["gate_done"] is True and done["distill_done"] is False  # after the gate, before distillation
    norms = json.loads((out / "probe" / "norms.json").read_text())
    assert set(norms) == {"writing", "coding"} and all(v > 0 for v in norms.values())
    assert done["queries"] == 8  # the labelled pairs: 4 queries per persona, 2 domains
    assert "probe" in res["report"]["stage_peak_rss_mb"]  # it shows in the training report
    saved = json.loads((out / "probe.meta.json").read_text())["settings"]
    assert saved == {"model": str(tiny_model_dir), "seed": 0, "probe": {"pooling": "mean"}}

    # resumed: a rerun does nothing (no stage trains again)
    monkeypatch.setattr(G, "train_gate_on_records", lambda *a, **k: pytest.fail("gate retrained"))
    monkeypatch.setattr(D, "distill_loss", lambda *a, **k: pytest.fail("distillation redone"))
    assert run_pipeline(_cfg(tiny_model_dir, out), engine=BootstrapEngine())["artifact"] is not None
    assert toy_stage.CALLS == ["probe"]

    # a changed setting of the finished toy stage is refused with the --redo hint, like a built-in one's
    monkeypatch.setattr(toy_stage, "POOLING", "last")
    with pytest.raises(ConfigMismatchError, match="--redo probe"):
        run_pipeline(_cfg(tiny_model_dir, out), engine=BootstrapEngine())

    # --redo probe redoes it alone (gate and distillation are kept)
    removed = redo(out, "probe")
    assert {"probe.done.json", "probe", "probe.meta.json"} <= set(removed) and (out / "gate.done.json").exists()
    assert run_pipeline(_cfg(tiny_model_dir, out), engine=BootstrapEngine())["artifact"] is not None
    assert toy_stage.CALLS == ["probe", "probe"]
    assert json.loads((out / "probe.meta.json").read_text())["settings"]["probe"] == {"pooling": "last"}


def test_register_refuses_a_stage_before_what_it_depends_on(monkeypatch):
    monkeypatch.setattr(S, "STAGES", S.STAGES)
    with pytest.raises(ValueError, match="depends on verdicts"):
        S.register(S.Stage.training("early", ("verdicts",), "nowhere"), after="queries")
    with pytest.raises(ValueError, match="no stage 'nope'"):
        S.register(S.Stage.training("early", ("verdicts",), "nowhere"), after="nope")
    assert S.stage_names() == ["personas", "queries", "answers", "verdicts", "gate", "distill"]


TOY_BOOTSTRAP = '''
"""A toy bootstrap stage: how much longer the persona answer is than the base one, per answer."""

from prism_persona import stages
from prism_persona.bootstrap.answers import answers_settings

CALLS = []
UNIT = "chars"


def ratios_settings(cfg) -> dict:
    """The answers' settings (its upstream stage) and its own."""
    s = answers_settings(cfg)
    s["ratios"] = {"unit": UNIT}
    return s


def step(ctx) -> None:
    store = ctx.run.store("ratios", depends_on=ctx.settings)
    todo = [a for a in ctx.outputs["answers"] if a["key"] not in store]
    CALLS.append(len(todo))
    store.extend(
        {"key": a["key"], "ratio": len(a["persona_answer"]) / max(1, len(a["base_answer"]))} for a in todo
    )
    ctx.outputs["ratios"] = [store.get(a["key"]) for a in ctx.outputs["answers"]]


stages.register(stages.Stage("ratios", ("answers",), __name__, ("ratios.jsonl",), ("ratios",)), after="answers")
'''


@pytest.fixture
def toy_bootstrap_stage(tmp_path, monkeypatch):
    pkg = tmp_path / "toy_boot"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "ratios.py").write_text(textwrap.dedent(TOY_BOOTSTRAP))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(S, "STAGES", S.STAGES)
    try:
        yield importlib.import_module("toy_boot.ratios")
    finally:
        for name in ("toy_boot.ratios", "toy_boot"):
            sys.modules.pop(name, None)


def test_a_registered_bootstrap_stage_writes_records_in_order_and_resumes(toy_bootstrap_stage, tmp_path, monkeypatch):
    from prism_persona.testing import bootstrap_config
    from prism_persona.train.pipeline import run_bootstrap

    assert S.bootstrap_stages() == ("personas", "queries", "answers", "ratios", "verdicts")
    assert redo_stages("answers")[:3] == ["answers", "ratios", "verdicts"]
    cfg = bootstrap_config(tmp_path / "run", queries={"queries_per_persona": 3, "per_request": 3})
    run_bootstrap(cfg, engine=BootstrapEngine())
    records = [json.loads(line) for line in (tmp_path / "run" / "ratios.jsonl").read_text().splitlines()]
    pairs = json.loads((tmp_path / "run" / "bootstrap.done.json").read_text())["pairs"]
    assert len(records) == pairs == 6 and toy_bootstrap_stage.CALLS == [6]
    assert all(r["ratio"] > 0 for r in records)
    assert json.loads((tmp_path / "run" / "ratios.meta.json").read_text())["settings"]["ratios"] == {"unit": "chars"}

    run_bootstrap(cfg, engine=BootstrapEngine())  # resumed: nothing left to do
    assert toy_bootstrap_stage.CALLS == [6, 0]

    monkeypatch.setattr(toy_bootstrap_stage, "UNIT", "tokens")  # its records were made with other settings
    with pytest.raises(ConfigMismatchError, match="ratios"):
        run_bootstrap(cfg, engine=BootstrapEngine())
    assert toy_bootstrap_stage.CALLS == [6, 0]  # refused before any stage ran


def test_the_prism_cli_sees_an_installed_packages_stage(tmp_path, monkeypatch, capsys):
    """An installed package's ``prism_persona.stages`` entry point is the one registration line: the CLI
    imports the module (which registers the stage) when it builds its parser, so ``--redo`` knows it."""
    from prism_persona.cli import main

    pkg = tmp_path / "toy_stages"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "probe.py").write_text(textwrap.dedent(TOY))
    (pkg / "broken.py").write_text("raise RuntimeError('the plug-in is broken')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(S, "STAGES", S.STAGES)  # restored at teardown: the registration is undone
    meta = tmp_path / "toy_stages-0.1.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-stages\nVersion: 0.1\n", encoding="utf-8")
    try:
        assert main(["run", "--redo", "probe", "--help"]) == 2  # not installed yet
        assert "argument --redo: invalid choice: 'probe'" in capsys.readouterr().err
        (meta / "entry_points.txt").write_text("[prism_persona.stages]\nprobe = toy_stages.probe\n")
        assert main(["run", "--redo", "probe", "--help"]) == 0
        assert "--redo STAGE" in capsys.readouterr().out and S.training_stages() == ("gate", "probe", "distill")

        (meta / "entry_points.txt").write_text("[prism_persona.stages]\nbroken = toy_stages.broken\n")
        assert main(["run", "--help"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert "stage entry point 'broken = toy_stages.broken' (package toy-stages) failed to import" in err
        assert "RuntimeError: the plug-in is broken" in err
    finally:
        for name in ("toy_stages.probe", "toy_stages.broken", "toy_stages"):
            sys.modules.pop(name, None)
