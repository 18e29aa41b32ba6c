"""format_version of RUN/config.json (and config files) and of an artifact's prism_config.json."""

from __future__ import annotations

import json

import pytest

from prism_persona import config as C
from prism_persona import formats as F
from prism_persona.errors import PrismError
from prism_persona.gated.artifact import PRISM_CONFIG, Artifact
from prism_persona.testing import make_tiny_artifact


def test_migrations_run_one_step_at_a_time_in_order():
    steps = []

    def one_to_two(d):
        steps.append(1)
        d = dict(d)
        d["b"] = d.pop("a")
        return d

    def two_to_three(d):
        steps.append(2)
        return {**d, "c": d["b"] * 2}

    fmt = F.FileFormat("test file", 3, {1: one_to_two, 2: two_to_three})
    assert F.upgrade({"a": 2}, fmt, "x.json") == {"b": 2, "c": 4, "format_version": 3}
    assert steps == [1, 2]
    assert F.upgrade({"b": 1, "format_version": 2}, fmt, "x.json") == {"b": 1, "c": 2, "format_version": 3}
    assert F.upgrade({"c": 0, "format_version": 3}, fmt, "x.json") == {"c": 0, "format_version": 3}


@pytest.mark.parametrize("bad", [0, -1, "2", True, 1.5])
def test_a_bad_format_version_is_one_line(bad):
    with pytest.raises(PrismError, match="format_version must be a positive integer"):
        F.upgrade({"format_version": bad}, F.RUN_CONFIG, "x.json")


def test_run_config_is_written_with_its_version_and_read_without_one(tmp_path):
    cfg = C.resolve(overrides={"persona": {"domains": ["writing"]}})
    saved = json.loads(C.dump(cfg))
    assert saved["format_version"] == F.RUN_CONFIG.current == 1
    path = tmp_path / "config.json"
    path.write_text(json.dumps(saved))
    assert C.resolve(file=path) == cfg
    del saved["format_version"]  # a run made before the field existed: version 1
    path.write_text(json.dumps(saved))
    assert C.resolve(file=path) == cfg


def test_a_newer_run_config_is_refused_in_one_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"format_version": F.RUN_CONFIG.current + 1, "persona": {"domains": ["x"]}}))
    with pytest.raises(PrismError, match=r"config.json has format_version 2, newer than this PRISM reads \(1\)"):
        C.resolve(file=path)


def test_a_run_config_migration_is_applied_on_read(tmp_path, monkeypatch):
    """A version step of the run config runs when an older RUN/config.json is read."""

    def rename_seed(d):
        d = dict(d)
        d["seed"] = d.pop("old_seed")
        return d

    renamed = F.FileFormat("config file", 2, {1: rename_seed})
    monkeypatch.setattr(C, "RUN_CONFIG", renamed)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"old_seed": 7, "persona": {"domains": ["writing"]}}))
    assert C.resolve(file=path).seed == 7
    assert json.loads(C.dump(C.resolve(file=path)))["format_version"] == 2


def test_artifact_config_version(tiny_model_dir, tmp_path):
    art = make_tiny_artifact(tiny_model_dir, tmp_path / "prism", cache=False)  # edited below: never the shared one
    path = art / PRISM_CONFIG
    written = json.loads(path.read_text())
    assert written["format_version"] == F.SINGLE_ADAPTER_VERSION == 1  # one adapter: an older PRISM reads it
    del written["format_version"]  # an artifact assembled before the field existed
    path.write_text(json.dumps(written))
    read = Artifact.read(art)
    assert read.config["format_version"] == F.ARTIFACT_CONFIG.current == 2  # read through the v1 -> v2 step
    assert read.config["base_model"] == written["base_model"]
    newer = F.ARTIFACT_CONFIG.current + 1
    path.write_text(json.dumps({**written, "format_version": newer}))
    with pytest.raises(PrismError, match=f"prism_config.json has format_version {newer}, newer than this PRISM reads"):
        Artifact.read(art)


def test_a_multi_adapter_artifact_is_version_2_so_an_older_prism_refuses_it(tiny_model_dir, tmp_path, monkeypatch):
    """One adapter per persona is written as version 2: a reader that knows only version 1 (one adapter)
    stops with one line instead of loading the root adapter for every persona."""
    from prism_persona.gated import artifact as A
    from prism_persona.gated.gate import Gate, GateBundle

    single = make_tiny_artifact(tiny_model_dir, tmp_path / "one", cache=False)
    gate = GateBundle(gate=Gate(8, [], dropout=0.0, pooling="mean"), threshold=0.5)  # the file format only
    adapters = [("first", single / "adapter"), ("second", single / "adapter")]
    art = A.write_artifact(tmp_path / "multi", model_spec=str(tiny_model_dir), gate=gate, adapters=adapters)
    written = json.loads((art / PRISM_CONFIG).read_text())
    assert written["format_version"] == 2 and written["personas"] == ["first", "second"]
    monkeypatch.setattr(A, "ARTIFACT_CONFIG", F.FileFormat("artifact config", 1))  # a PRISM from before
    with pytest.raises(PrismError, match="format_version 2, newer than this PRISM reads"):
        Artifact.read(art)
    monkeypatch.undo()
    assert Artifact.read(art).config["personas"] == ["first", "second"]


def test_gate_config_version(tmp_path):
    import torch

    from prism_persona.gated.gate import GATE_CONFIG, Gate, GateBundle

    torch.manual_seed(0)
    gate = Gate(8, [], dropout=0.0, pooling="mean")
    with torch.no_grad():
        gate.mlp[-1].weight.normal_()
    GateBundle(gate=gate, threshold=0.3).save(tmp_path)
    path = tmp_path / GATE_CONFIG
    written = json.loads(path.read_text())
    # a binary gate is still written as version 1 (an older PRISM reads it); version 2 adds personas
    assert written["format_version"] == 1 and F.GATE_CONFIG.current == 2
    del written["format_version"]  # a gate saved before the field existed
    path.write_text(json.dumps(written))
    read = GateBundle.load(tmp_path)
    assert read.info["format_version"] == F.GATE_CONFIG.current and read.threshold == 0.3  # migrated on read
    x = torch.randn(5, 8)
    assert torch.equal(read.gate(x), gate(x))
    path.write_text(json.dumps({**written, "format_version": 3}))
    with pytest.raises(PrismError, match="gate_config.json has format_version 3, newer than this PRISM reads"):
        GateBundle.load(tmp_path)
