"""The one artifact reader: every loader refuses an incomplete artifact with one line, before any model loads."""

from __future__ import annotations

import json
import shutil

import pytest

from prism_persona.cli import main
from prism_persona.errors import PrismError
from prism_persona.gated.artifact import Artifact


def test_read_gives_typed_fields(artifact_copy, tiny_model_dir):
    art = Artifact.read(artifact_copy)
    assert art.base_model == str(tiny_model_dir)
    assert art.adapter_dir == artifact_copy.resolve() / "adapter"
    assert art.gate().gate.hidden_size == 64


def test_missing_adapter_is_refused_by_every_full_loader(artifact_copy, tmp_path, capsys, monkeypatch):
    import prism_persona.models as M
    from prism_persona.gated.export import export
    from prism_persona.gated.model import GatedModel

    shutil.rmtree(artifact_copy / "adapter")
    monkeypatch.setattr(M, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    for load in (lambda: GatedModel.from_pretrained(artifact_copy), lambda: export(artifact_copy, tmp_path / "x")):
        with pytest.raises(PrismError, match="has no LoRA adapter"):
            load()
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"prompt": "hi"}) + "\n")
    rc = main(["generate", "--prism", str(artifact_copy), "--input", str(inp), "--output", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "has no LoRA adapter" in err[0]
    # routing alone needs no adapter
    assert Artifact.read(artifact_copy, need_adapter=False).base_model


@pytest.mark.parametrize(
    "breakage, needle",
    [
        (lambda d: (d / "prism_config.json").write_text("{not json"), "is not valid JSON"),
        (lambda d: (d / "prism_config.json").write_bytes(b"\xff\xfe\x00"), "is not valid JSON"),
        (lambda d: (d / "prism_config.json").write_text("{}"), "names no base_model"),
        (lambda d: (d / "gate.safetensors").unlink(), "has no gate.safetensors"),
        (lambda d: (d / "prism_config.json").unlink(), "is not a PRISM artifact"),
    ],
)
def test_broken_artifact_is_one_line(artifact_copy, breakage, needle):
    breakage(artifact_copy)
    with pytest.raises(PrismError, match=needle) as info:
        Artifact.read(artifact_copy)
    assert "\n" not in str(info.value)
