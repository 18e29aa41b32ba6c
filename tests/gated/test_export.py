"""`prism export --format vllm`: the exported adapter is plain PEFT over all layers (zeros on layer 0)
and gives the same logits as the original layers-1..L-1 adapter."""

from __future__ import annotations

import json

import pytest
import torch

from prism_persona.testing import make_tiny_artifact


@pytest.fixture(scope="module")
def artifact(tiny_model_dir, tmp_path_factory):
    return make_tiny_artifact(tiny_model_dir, tmp_path_factory.mktemp("export") / "prism")


def _logits_with_adapter(model_dir, adapter_dir, input_ids):
    from peft import PeftModel

    from prism_persona.models import load_model

    base, _ = load_model(str(model_dir), dtype="float32", device="cpu")
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_exported_adapter_matches_the_original(tiny_model_dir, artifact, tmp_path):
    from safetensors.torch import load_file

    from prism_persona.cli import main
    from prism_persona.models import load_tokenizer

    out = tmp_path / "vllm"
    assert main(["export", "--prism", str(artifact), "--format", "vllm", str(out)]) == 0

    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert "layers_to_transform" not in cfg and "layers_pattern" not in cfg
    assert cfg["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    layer0 = [k for k in weights if ".layers.0." in k]
    assert len(layer0) == 14 and all(float(weights[k].abs().sum()) == 0.0 for k in layer0)
    assert any(float(v.abs().sum()) > 0 for k, v in weights.items() if ".layers.1." in k and "lora_B" in k)
    for name in ("gate.safetensors", "gate_config.json", "prism_config.json", "README.md"):
        assert (out / name).is_file()
    readme = (out / "README.md").read_text()
    assert "vllm serve" in readme and f"--lora-modules prism={(out / 'adapter').resolve()}" in readme
    assert "prism serve --route-only" in readme

    tok = load_tokenizer(str(tiny_model_dir))
    ids = tok(["a short prompt about tides", "fix my code please"], return_tensors="pt", padding=True)["input_ids"]
    original = _logits_with_adapter(tiny_model_dir, artifact / "adapter", ids)
    exported = _logits_with_adapter(tiny_model_dir, out / "adapter", ids)
    from prism_persona.models import load_model

    base, _ = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    assert (original - plain).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(exported, original, atol=1e-5, rtol=1e-5)

    # the export is also a valid route-only artifact
    from prism_persona.gated.router import load_router

    router = load_router(str(out), device="cpu", dtype="float32")
    assert len(router.route([[{"role": "user", "content": "hi"}]])) == 1


def test_export_refuses_to_overwrite_and_bad_input(artifact, tmp_path, capsys):
    from prism_persona.cli import main

    out = tmp_path / "vllm"
    assert main(["export", "--prism", str(artifact), str(out)]) == 0
    assert main(["export", "--prism", str(artifact), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", "--prism", str(artifact), str(out), "--overwrite"]) == 0
    assert main(["export", "--prism", str(tmp_path / "nope"), str(tmp_path / "o2")]) == 2
    assert "not a PRISM artifact" in capsys.readouterr().err
