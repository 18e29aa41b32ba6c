"""Artifacts a user may receive (issue 14 items 1, 5, 6, 10, 11): they never switch on custom code,
corrupt files are one line before any model loads, assembly is atomic, the base model is checked."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from prism_persona.cli import main
from prism_persona.errors import PrismError
from prism_persona.gated.artifact import Artifact, base_fingerprint, write_artifact


def edit_config(art, **changes):
    cfg = json.loads((art / "prism_config.json").read_text())
    cfg.update(changes)
    (art / "prism_config.json").write_text(json.dumps(cfg))


def prompts(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"prompt": "hi"}) + "\n")
    return inp


# --------------------------------------------------------------------------------------------------
# item 1: trust_remote_code only from the user's flag


def test_artifact_asking_for_remote_code_is_refused_without_the_flag(artifact_copy, tmp_path, no_model_load, capsys):
    from prism_persona.gated.model import GatedModel
    from prism_persona.serve.backend import load_backend

    edit_config(artifact_copy, trust_remote_code=True)
    for load in (
        lambda: GatedModel.from_pretrained(artifact_copy),
        lambda: load_backend(str(artifact_copy), route_only=True),
    ):
        with pytest.raises(PrismError, match="--trust-remote-code"):
            load()
    rc = main(
        [
            "generate",
            "--prism",
            str(artifact_copy),
            "--input",
            str(prompts(tmp_path)),
            "--output",
            str(tmp_path / "o.jsonl"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "runs its own code" in err[0] and "--trust-remote-code" in err[0]


def test_remote_code_flag_reaches_the_loader(artifact_copy, tmp_path, monkeypatch):
    import prism_persona.gated.model as GM

    seen = {}
    real = GM.load_model

    def spy(*a, **k):
        seen["trust"] = k.get("trust_remote_code")
        return real(*a, **k)

    monkeypatch.setattr(GM, "load_model", spy)
    edit_config(artifact_copy, trust_remote_code=True)
    out = tmp_path / "o.jsonl"
    assert (
        main(
            [
                "generate",
                "--prism",
                str(artifact_copy),
                "--input",
                str(prompts(tmp_path)),
                "--output",
                str(out),
                "--max-new-tokens",
                "2",
                "--trust-remote-code",
                "-q",
            ]
        )
        == 0
    )
    assert seen["trust"] is True and out.is_file()
    edit_config(artifact_copy, trust_remote_code=False)  # the artifact can never turn it on by itself
    assert (
        main(
            [
                "generate",
                "--prism",
                str(artifact_copy),
                "--input",
                str(prompts(tmp_path)),
                "--output",
                str(out),
                "--max-new-tokens",
                "2",
                "-q",
            ]
        )
        == 0
    )
    assert seen["trust"] is False


# --------------------------------------------------------------------------------------------------
# item 11: corrupt artifact files are one line, before the model loads


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize(
    "breakage, needle",
    [
        (lambda d: (d / "gate.safetensors").unlink(), "gate.safetensors"),
        (lambda d: _truncate(d / "gate.safetensors"), "gate.safetensors is not a valid safetensors file"),
        (lambda d: (d / "gate.safetensors").write_bytes(bytes(range(256)) * 40), "is not a valid safetensors file"),
        (lambda d: (d / "gate.safetensors").write_bytes(b""), "is not a valid safetensors file"),
        (lambda d: (d / "gate_config.json").write_text("{oops"), "gate_config.json is not valid JSON"),
        (
            lambda d: (d / "adapter" / "adapter_model.safetensors").write_bytes(b""),
            "adapter_model.safetensors is not a valid",
        ),
        (
            lambda d: _truncate(d / "adapter" / "adapter_model.safetensors", 0.9),
            "adapter_model.safetensors is not a valid",
        ),
        (lambda d: (d / "adapter" / "adapter_config.json").write_text("[1,"), "adapter_config.json is not valid JSON"),
    ],
)
def test_corrupt_artifact_files_are_one_line_before_any_model_loads(
    artifact_copy, tmp_path, breakage, needle, no_model_load, capsys
):
    breakage(artifact_copy)
    rc = main(
        [
            "generate",
            "--prism",
            str(artifact_copy),
            "--input",
            str(prompts(tmp_path)),
            "--output",
            str(tmp_path / "o.jsonl"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err


# --------------------------------------------------------------------------------------------------
# item 6: assembly is atomic


def test_interrupted_reassembly_leaves_the_old_artifact_whole(artifact_copy, tmp_path, monkeypatch):
    import prism_persona.gated.artifact as A

    before = {p.relative_to(artifact_copy): p.read_bytes() for p in artifact_copy.rglob("*") if p.is_file()}
    art = Artifact.read(artifact_copy)
    real_copytree = shutil.copytree

    def copy_then_die(src, dst, **kw):
        real_copytree(src, dst, **kw)
        raise KeyboardInterrupt("killed while assembling")

    monkeypatch.setattr(A.shutil, "copytree", copy_then_die)
    with pytest.raises(KeyboardInterrupt):
        write_artifact(artifact_copy, model_spec=art.base_model, gate=art.gate(), adapter_dir=art.adapter_dir)
    after = {p.relative_to(artifact_copy): p.read_bytes() for p in artifact_copy.rglob("*") if p.is_file()}
    assert after == before
    assert not list(artifact_copy.parent.glob(".prism.*")), "no half-built directory is left behind"
    monkeypatch.setattr(A.shutil, "copytree", real_copytree)
    write_artifact(
        artifact_copy, model_spec=art.base_model, gate=art.gate(), adapter_dir=art.adapter_dir, extra={"note": "new"}
    )
    assert Artifact.read(artifact_copy).config["note"] == "new"
    assert sorted(p.name for p in artifact_copy.parent.iterdir()) == ["prism"]


# --------------------------------------------------------------------------------------------------
# item 10: the base model's fingerprint


def test_other_base_model_is_refused_and_old_artifacts_load_with_a_note(
    artifact_copy, tiny_model_dir, tiny_model, tmp_path, caplog
):
    from prism_persona.gated.model import GatedModel
    from prism_persona.testing import make_tiny_model

    model, _ = tiny_model
    edit_config(artifact_copy, base_fingerprint=base_fingerprint(model))
    assert GatedModel.from_pretrained(artifact_copy, dtype="float32", device="cpu").model is not None
    # same shape, other weights (another seed): refused with one line
    other = make_tiny_model(tmp_path / "other", num_layers=3, hidden_size=64, seed=7)
    edit_config(artifact_copy, base_model=str(other))
    with pytest.raises(PrismError, match="is not the base model .* trained on") as err:
        GatedModel.from_pretrained(artifact_copy, dtype="float32", device="cpu")
    assert "\n" not in str(err.value)
    # a bfloat16 load of the right model passes (the probe tolerates the dtype)
    edit_config(artifact_copy, base_model=str(tiny_model_dir))
    GatedModel.from_pretrained(artifact_copy, dtype="bfloat16", device="cpu")
    # the route-only loader (one decoder layer) checks it too
    from prism_persona.gated.router import load_router

    load_router(str(artifact_copy), "cpu", "float32")
    edit_config(artifact_copy, base_model=str(other))
    with pytest.raises(PrismError, match="not the base model"):
        load_router(str(artifact_copy), "cpu", "float32")
    # an artifact from before fingerprints: loads, with a note in the log
    cfg = json.loads((artifact_copy / "prism_config.json").read_text())
    cfg.pop("base_fingerprint")
    cfg["base_model"] = str(other)
    (artifact_copy / "prism_config.json").write_text(json.dumps(cfg))
    with caplog.at_level(logging.INFO):
        GatedModel.from_pretrained(artifact_copy, dtype="float32", device="cpu")
    assert "records no base-model fingerprint" in caplog.text
