"""One adapter per persona: the distillation runs once per persona on that persona's records, and
the artifact assembled from them holds each adapter under its persona's name."""

from __future__ import annotations

import json

import pytest
import torch

from prism_persona import config as C
from prism_persona.gated.artifact import Artifact, assemble
from prism_persona.gated.gate import Gate, GateBundle
from prism_persona.models import load_model
from prism_persona.store import RunDir
from prism_persona.train import personas as P


def _cfg(tmp_path, domains, files=None, **distill):
    d = {"r": 4, "alpha": 8, "epochs": 1, "batch_size": 2, "lr": 5e-3, "max_length": 256, "top_k": 16}
    d.update({"warmup_ratio": 0.0, "loss": "kl", "min_steps": 0, "val_fraction": 0.0})
    d.update(distill)
    persona = {"domains": list(domains), "persona_files": dict(files or {})}
    return C.resolve("tiny", overrides={"out": str(tmp_path / "run"), "persona": persona, "distill": d})


def _records(domain, persona, n=4):
    return [
        {
            "key": f"{domain}{i}",
            "domain": domain,
            "query": f"{domain} question number {i}, please?",
            "persona": persona,
            "placement": "system",
            "base_answer": "ok",
            "persona_answer": f"As a {domain} expert: answer {i} with care and detail.",
            "label": 1,
        }
        for i in range(n)
    ]


def test_persona_groups_share_a_file_and_name_folders(tmp_path):
    story = tmp_path / "Story Teller.txt"
    story.write_text("You tell stories.")
    (tmp_path / "b").mkdir()
    other = tmp_path / "b" / "Story Teller.txt"  # the same stem, another file: another persona
    other.write_text("You also tell stories.")
    cfg = _cfg(
        tmp_path,
        ["stories", "safety", "poems", "default", "more"],
        {"stories": str(story), "poems": str(story), "more": str(other)},
    )
    groups = P.persona_groups(cfg)
    assert groups == {
        "Story-Teller": ["stories", "poems"],
        "safety": ["safety"],
        "default-2": ["default"],  # only the first adapter may carry PEFT's root name
        "Story-Teller-2": ["more"],
    }


def test_each_persona_distils_on_its_own_domains(tmp_path, monkeypatch):
    import prism_persona.train.distill as D

    seen = {}

    def fake(run, cfg, records, model=None, tokenizer=None, max_steps=None):
        seen[run.root.name] = sorted({r["domain"] for r in records})
        return {"examples": len(records)}

    monkeypatch.setattr(D, "run_distill", fake)
    files = {"coding": str(tmp_path / "coder.txt"), "review": str(tmp_path / "coder.txt")}
    cfg = _cfg(tmp_path, ["writing", "coding", "review"], files)
    recs = _records("writing", "W") + _records("coding", "C") + _records("review", "C", 2)
    out = P.distill_personas(RunDir(cfg.out), cfg, recs, model=object(), tokenizer=object())
    assert seen == {"writing": ["writing"], "coder": ["coding", "review"]}
    assert out == {"writing": {"examples": 4}, "coder": {"examples": 6}}
    listing = RunDir(cfg.out).read_json("distill/personas.json")["personas"]
    assert [p["name"] for p in listing] == ["writing", "coder"]
    assert listing[1]["adapter"] == "distill/personas/coder/distill/adapter"


@pytest.mark.parametrize("n_personas", [1, 2])
def test_distilled_personas_assemble_into_a_loadable_artifact(tmp_path, tiny_model_dir, n_personas):
    domains = ["writing", "coding"][:n_personas]
    cfg = _cfg(tmp_path, domains)
    run = RunDir(cfg.out)
    recs = _records("writing", "You are a poet.") + _records("coding", "You are a coder.")
    model, tok = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    cfg.model.model = str(tiny_model_dir)
    info = P.distill_personas(run, cfg, recs, model, tok, max_steps=1)
    assert list(info) == domains and all(i["steps"] == 1 for i in info.values())
    gate = Gate(model.config.hidden_size, [8], dropout=0.0, pooling="last")
    gate.set_standardisation(torch.randn(4, model.config.hidden_size))
    GateBundle(gate=gate, threshold=0.5, info={"metrics": {}}).save(run.path("gate"))
    art = Artifact.read(assemble(run, cfg))
    cfg_json = json.loads((art.path / "prism_config.json").read_text())
    if n_personas == 1:  # today's artifact exactly
        assert "personas" not in cfg_json and art.adapters == [("default", art.path / "adapter")]
        return
    assert art.personas == ["writing", "coding"]
    from safetensors.torch import load_file

    w0 = load_file(str(art.path / "adapter" / "adapter_model.safetensors"))
    w1 = load_file(str(art.path / "adapter" / "coding" / "adapter_model.safetensors"))
    assert w0.keys() == w1.keys()
    assert any(not torch.equal(w0[k], w1[k]) for k in w0 if "lora_B" in k), "two trainings, two adapters"
