"""`prism eval` names an artifact by its files, not only its path: an artifact re-assembled at the same
path (`prism run --redo gate`, another threshold) never reuses the cached answers of the one before."""

from __future__ import annotations

import json
from pathlib import Path

from prism_persona.cli import main
from prism_persona.gated.artifact import content_id

FIX = Path(__file__).resolve().parents[1] / "fixtures"


def _eval(art: Path, out: Path) -> list[dict]:
    argv = ["eval", "--prism", str(art), "--systems", "prism,lora", "--benchmarks", "pku"]
    argv += ["--pku", str(FIX / "pku_small.json"), "--refusal-classifier", "string", "--limit", "2"]
    argv += ["--safety-tokens", "3", "--resamples", "20", "--out", str(out), "-q"]
    assert main(argv) == 0
    return [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]


def test_a_changed_artifact_at_the_same_path_is_answered_again(tmp_path, monkeypatch, tiny_model_dir):
    from prism_persona.testing import make_tiny_artifact

    monkeypatch.setenv("PRISM_CACHE", str(tmp_path / "cache"))
    art = make_tiny_artifact(tiny_model_dir, tmp_path / "run" / "prism", cache=False)
    out = tmp_path / "e"
    first = _eval(art, out)
    assert {r["system"] for r in first} >= {"prism", "lora"}
    assert len(_eval(art, out)) == len(first)  # the same files: every answer read from the cache

    before = content_id(art)
    cfg_path = art / "prism_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["threshold"] = 0.0 if cfg["threshold"] > 0 else 0.5  # re-assembled with another threshold
    cfg_path.write_text(json.dumps(cfg))
    assert content_id(art) != before
    again = _eval(art, out)
    new = again[len(first) :]
    gated = [r for r in first if r["system"] in ("prism", "lora")]
    assert sorted(r["system"] for r in new) == sorted(r["system"] for r in gated)  # both answered again
    assert {r["key"] for r in new}.isdisjoint(r["key"] for r in first)  # ... the base model's answers not


def test_the_identity_never_reads_through_a_link(tmp_path):
    """A link inside an artifact someone sent is hashed by the path it names: the file it points to,
    outside the artifact, is never read (it could be anything on this machine, or never end)."""
    art = tmp_path / "prism"
    (art / "adapter").mkdir(parents=True)
    (art / "gate_config.json").write_text("{}")
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("secret 1")
    (art / "adapter" / "adapter_model.safetensors").symlink_to(outside)
    first = content_id(art)
    outside.write_text("secret 2")  # what the link points to changes: not read, so no change
    assert content_id(art) == first
    (art / "adapter" / "adapter_model.safetensors").unlink()
    (art / "adapter" / "adapter_model.safetensors").symlink_to(tmp_path / "other.txt")
    assert content_id(art) != first  # the link now names another path
    (art / "gate_config.json").write_text('{"threshold": 0.4}')
    assert content_id(art) != first
