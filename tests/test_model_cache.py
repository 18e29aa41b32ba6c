"""GGUF sources are de-quantised once into a cache keyed by the file's hash (models.prepare_model)."""

from __future__ import annotations

import json
import logging
import os

import pytest

from prism_persona.models import ModelSource, prepare_model, prepared_dir, resolve_model


def test_hf_directories_and_hub_ids_are_not_prepared(tiny_model_dir):
    src = resolve_model(str(tiny_model_dir))
    assert prepare_model(src) is src
    hub = resolve_model("org/name")
    assert prepare_model(hub) is hub


def test_cache_key_follows_the_file_content(tmp_path, monkeypatch):
    monkeypatch.setenv("PRISM_CACHE", str(tmp_path / "cache"))
    a, b = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for path, content in ((a, b"GGUF one"), (b, b"GGUF two")):
        path.parent.mkdir()
        path.write_bytes(content)
    da, db = prepared_dir(resolve_model(str(a))), prepared_dir(resolve_model(str(b)))
    assert da != db and da.name.startswith("m-") and da.parent == tmp_path / "cache" / "models"
    b.write_bytes(b"GGUF one")  # same bytes, same key, wherever the file lives
    os.utime(b, ns=(1, 1))
    assert prepared_dir(resolve_model(str(b))) == da


def test_unwritable_cache_falls_back_to_the_gguf_with_a_warning(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("PRISM_CACHE", str(blocker))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    src = resolve_model(str(gguf))
    with caplog.at_level(logging.WARNING):
        assert prepare_model(src) == src
    assert "loading the GGUF directly" in caplog.text


def test_a_broken_gguf_is_a_one_line_error_and_leaves_no_partial_directory(tmp_path, monkeypatch):
    from prism_persona.errors import PrismError

    monkeypatch.setenv("PRISM_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"not a gguf at all")
    with pytest.raises(PrismError, match="broken.gguf"):
        prepare_model(resolve_model(str(gguf)), quiet=True)
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.slow
def test_embedded_gguf_is_prepared_once_and_loads_to_the_same_logits(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    from prism_persona.models import load_model

    monkeypatch.setenv("PRISM_CACHE", str(tmp_path / "cache"))
    src = resolve_model(None)
    prepared = prepare_model(src, quiet=True)
    assert isinstance(prepared, ModelSource) and prepared.gguf_file is None and prepared.kind == "embedded"
    marker = json.loads((prepared_dir(src) / "prism_prepared.json").read_text())
    assert marker["source"].endswith(".gguf") and len(marker["sha256"]) == 64
    stamp = os.stat(prepared_dir(src) / "model.safetensors").st_mtime_ns
    assert prepare_model(src) == prepared  # reused, not converted again
    assert os.stat(prepared_dir(src) / "model.safetensors").st_mtime_ns == stamp

    model, tok = load_model(None, dtype="float32", device="cpu")
    assert model.config._name_or_path == prepared.path_or_id
    direct = AutoModelForCausalLM.from_pretrained(src.path_or_id, gguf_file=src.gguf_file, dtype=torch.float32)
    ids = tok("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", return_tensors="pt")
    with torch.inference_mode():
        assert torch.equal(model(**ids).logits, direct(**ids).logits)
