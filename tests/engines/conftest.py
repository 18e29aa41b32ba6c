"""Fixtures shared by the engine tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def fake_engine(fake_python, tmp_path, monkeypatch, tiny_model_dir):
    """A VLLMEngine owning a stand-in vLLM server (base 'tiny', LoRA 'prism'); requests are logged to
    ``tmp_path/requests.jsonl``. Closing the engine must stop the server it owns."""
    from prism_persona.engines.vllm import VLLMEngine, VLLMServer
    from prism_persona.models import load_tokenizer

    monkeypatch.setenv("FAKE_VLLM_REQUESTS", str(tmp_path / "requests.jsonl"))
    srv = VLLMServer(
        str(tiny_model_dir), "tiny", fake_python, tmp_path / "vllm.log", loras={"prism": "/a"}, quiet=True
    ).start()
    engine = VLLMEngine(srv.base_url, "tiny", load_tokenizer(str(tiny_model_dir)), server=srv, concurrency=4)
    yield engine
    engine.close()
    assert srv.proc is None
