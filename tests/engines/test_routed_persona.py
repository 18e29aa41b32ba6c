"""The vLLM path with a K-way artifact (one adapter per persona): every adapter is served under its
persona's name (``--lora-modules NAME=DIR`` each, ``--max-loras K``) and the layer-0 router sends each
routed row to its persona's adapter (the stand-in vLLM of tests/fixtures/fake_vllm)."""

from __future__ import annotations

import json

import pytest

from prism_persona import cli
from prism_persona.testing import SPLIT_QUERIES, make_tiny_artifact

NAMES = ("story", "monitor")


@pytest.fixture
def kway(tmp_path, tiny_model_dir):
    return make_tiny_artifact(tiny_model_dir, tmp_path / "run" / "prism", personas=NAMES, cache=False)


def _generate(art, src, out, fake_python, *extra):
    argv = ["generate", "--prism", str(art), "--engine", "vllm", "--vllm-python", fake_python]
    assert cli.main([*argv, "--input", str(src), "--output", str(out), "-q", *extra]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_generate_on_vllm_sends_each_row_to_its_personas_adapter(
    tmp_path, monkeypatch, kway, tiny_model_dir, fake_python
):
    from prism_persona.gated.model import GatedModel

    monkeypatch.setenv("PRISM_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in SPLIT_QUERIES))
    rows = _generate(kway, src, tmp_path / "out.jsonl", fake_python)
    gm = GatedModel.from_pretrained(kway, device="cpu", dtype="float32")
    want = gm.decisions([[{"role": "user", "content": q}] for q in SPLIT_QUERIES])
    gm.close()
    assert [r["persona"] for r in rows] == [d["persona_name"] for d in want] == [None, "story", "monitor", None]
    for row, d in zip(rows, want):
        assert row["routed"] == d["routed"] and row["persona_prob"] == pytest.approx(d["persona_prob"])
        served = row["persona"] or str(tiny_model_dir)  # the persona's adapter by its name, or the base
        assert row["response"].startswith(served + ":")
    log = (tmp_path / "logs" / "vllm.log").read_text()
    export = tmp_path / "cache" / "serve"
    assert "--max-loras 2" in log
    assert "--lora-modules story=" in log and " monitor=" in log
    (story,) = export.glob("*/vllm-export/adapter")
    assert f"story={story} monitor={story / 'monitor'}" in log  # PEFT's layout: the first at the root
    forced = _generate(kway, src, tmp_path / "forced.jsonl", fake_python, "--force", "monitor")
    assert all(r["routed"] and r["persona"] == "monitor" and r["response"].startswith("monitor:") for r in forced)


def test_prism_serve_engine_vllm_starts_every_persona(tmp_path, monkeypatch, kway, fake_python):
    from prism_persona.config import EngineConfig
    from prism_persona.gated.remote import start_for_artifact

    monkeypatch.setenv("PRISM_CACHE", str(tmp_path / "cache"))
    server, name = start_for_artifact(EngineConfig(engine="vllm", vllm_python=fake_python), kway, quiet=True)
    try:
        assert list(server.loras) == list(NAMES) and name == "story"
        assert "--max-loras" in server.command()
    finally:
        server.stop()
