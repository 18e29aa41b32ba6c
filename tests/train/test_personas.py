"""One adapter per persona: the distillation runs once per persona on that persona's records, and
the artifact assembled from them holds each adapter under its persona's name."""

from __future__ import annotations

import json

import pytest
import torch

from prism_persona import config as C
from prism_persona.errors import PrismError
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


def _write_personas(cfg, texts: dict):
    """``RUN/personas.jsonl`` with ``texts`` (domain -> text) at the run's persona length."""
    run = RunDir(cfg.out)
    run.root.mkdir(parents=True, exist_ok=True)
    n = cfg.persona.use_length
    rows = [{"key": f"{d}-{n}", "domain": d, "length": n, "text": t, "source": "model"} for d, t in texts.items()]
    run.path("personas.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_persona_groups_and_the_gate_share_one_persona_list(tmp_path):
    """Same text = same persona, from a file or generated; named by the file's stem or the domain; the
    gate's classes and the distilled adapters come from one function, in one order."""
    from prism_persona.train.gate import personas_of_run as gate_personas

    story = tmp_path / "Story Teller.txt"
    (tmp_path / "b").mkdir()
    other = tmp_path / "b" / "Story Teller.txt"  # the same stem, another text: another persona
    copy = tmp_path / "b" / "tales.txt"  # another file, the same text as story: the same persona
    domains = ["stories", "safety", "poems", "default", "more", "fables", "chat"]
    files = {"stories": str(story), "poems": str(story), "more": str(other), "fables": str(copy)}
    cfg = _cfg(tmp_path, domains, files, **{})
    cfg.gate.classes = "personas"
    texts = {"stories": "You tell stories.", "poems": "You tell stories.", "more": "You also tell stories."}
    texts.update({"fables": "You tell stories.", "safety": "You refuse.", "default": "You help."})
    texts["chat"] = "You refuse."  # generated, the same text as safety's: one persona
    run = _write_personas(cfg, texts)
    recs = [r for d in domains for r in _records(d, texts[d], 1)]
    groups = P.persona_groups(run, cfg, recs)
    assert groups == {
        "Story-Teller": ["stories", "poems", "fables"],
        "safety": ["safety", "chat"],
        "default-2": ["default"],  # only the first adapter may carry PEFT's root name
        "Story-Teller-2": ["more"],
    }
    assert [(p["name"], p["domains"]) for p in gate_personas(run, cfg, recs)] == list(groups.items())
    cfg.gate.classes = "binary"  # one adapter for all, today's distillation
    assert list(P.persona_groups(run, cfg, recs).values()) == [sorted(domains)]


def test_a_persona_that_never_won_gets_no_adapter_and_no_gate_class(tmp_path, tiny_model):
    """Three persona texts, one of which won nowhere: two adapters, a K = 2 gate over the same two names,
    and that persona's queries are base rows of the gate."""
    from prism_persona.train.gate import run_gate

    model, tok = tiny_model
    cfg = _cfg(tmp_path, ["writing", "coding", "cooking"])
    cfg.gate.classes = "personas"
    cfg.gate.base_queries = "off"
    run = _write_personas(cfg, {"writing": "You are a poet.", "coding": "You are a coder.", "cooking": "You cook."})
    recs = _records("writing", "You are a poet.", 8) + _records("coding", "You are a coder.", 8)
    recs += [dict(r, label=0) for r in _records("cooking", "You cook.", 8)]
    for i, r in enumerate(recs):
        if r["domain"] != "cooking" and i % 2:
            r["label"] = 0
    assert [p["name"] for p in P.personas_of_run(run, cfg, recs)] == ["writing", "coding", "cooking"]
    assert [p["name"] for p in P.routed_personas(run, cfg, recs)] == ["writing", "coding"]
    info = run_gate(run, cfg, recs, model, tok)
    assert info["personas"] == list(P.persona_groups(run, cfg, recs)) == ["writing", "coding"]
    counts = GateBundle.load(run.path("gate")).info["class_counts"]
    assert counts == [sum(1 for r in recs if not r["label"]), 4, 4]  # cooking's 8 rows are base rows
    # only one persona won: the binary gate and one adapter, as today
    solo = [dict(r, label=0) if r["domain"] == "coding" else r for r in recs]
    assert P.routed_personas(run, cfg, solo) == []
    assert len(P.persona_groups(run, cfg, solo)) == 1


@pytest.mark.parametrize("n_personas", [1, 2])
def test_distilled_personas_assemble_into_a_loadable_artifact(tmp_path, tiny_model_dir, n_personas):
    domains = ["writing", "coding"][:n_personas]
    cfg = _cfg(tmp_path, domains)
    cfg.gate.classes = "personas"
    run = _write_personas(cfg, {"writing": "You are a poet.", "coding": "You are a coder."})
    recs = _records("writing", "You are a poet.") + _records("coding", "You are a coder.")
    recs = [r for r in recs if r["domain"] in domains]
    model, tok = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    cfg.model.model = str(tiny_model_dir)
    info = P.distill_personas(run, cfg, recs, model, tok, max_steps=1)
    assert list(info) == domains and all(i["steps"] == 1 for i in info.values())
    gate = Gate(model.config.hidden_size, [8], dropout=0.0, pooling="last", personas=n_personas)
    gate.set_standardisation(torch.randn(4, model.config.hidden_size))
    listed = [{"name": d} for d in domains] if n_personas > 1 else []
    GateBundle(gate=gate, threshold=0.5, info={"metrics": {}, "personas": listed[::-1]}).save(run.path("gate"))
    if n_personas > 1:  # a gate whose persona k is not adapter k is refused
        with pytest.raises(
            PrismError,
            match=r"routes to 2 personas \(coding, writing\) but the distillation trained 2 personas \(writing, coding\)",
        ):
            assemble(run, cfg)
        GateBundle(gate=gate, threshold=0.5, info={"metrics": {}, "personas": listed}).save(run.path("gate"))
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


def test_a_killed_persona_run_resumes_without_redoing_or_losing_a_persona(tmp_path, tiny_model_dir, monkeypatch):
    """The process dies while the second persona distils (after the first finished): the rerun skips the
    first (its adapter untouched), trains the second, and lists both; a third run redoes nothing."""
    import prism_persona.train.distill as D

    cfg = _cfg(tmp_path, ["writing", "coding"])
    cfg.gate.classes = "personas"
    cfg.model.model = str(tiny_model_dir)
    run = _write_personas(cfg, {"writing": "You are a poet.", "coding": "You are a coder."})
    recs = _records("writing", "You are a poet.") + _records("coding", "You are a coder.")
    model, tok = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    real, trained = D.run_distill, []

    class Killed(BaseException):  # like kill -9: nothing after it runs, no handler cleans up
        pass

    def dies_in_coding(sub, *a, **kw):
        if sub.root.name == "coding" and not sub.done(D.STAGE):
            raise Killed
        return counting(sub, *a, **kw)

    def counting(sub, *a, **kw):
        if not sub.done(D.STAGE):
            trained.append(sub.root.name)
        return real(sub, *a, **kw)

    monkeypatch.setattr(D, "run_distill", dies_in_coding)
    with pytest.raises(Killed):
        P.distill_personas(run, cfg, recs, model, tok, max_steps=1)
    assert trained == ["writing"] and not run.done(D.STAGE) and not run.path("distill/personas.json").exists()
    first = run.path("distill/personas/writing/distill/adapter/adapter_model.safetensors")
    before = first.read_bytes(), first.stat().st_mtime_ns
    monkeypatch.setattr(D, "run_distill", counting)
    out = P.distill_personas(run, cfg, recs, model, tok, max_steps=1)
    assert trained == ["writing", "coding"] and list(out) == ["writing", "coding"]
    assert (first.read_bytes(), first.stat().st_mtime_ns) == before
    assert [p["name"] for p in run.read_json("distill/personas.json")["personas"]] == ["writing", "coding"]
    done = run.read_json("distill.done.json")
    assert [p["name"] for p in done["personas"]] == ["writing", "coding"] and done["steps"] == 2
    assert P.distill_personas(run, cfg, recs, model, tok, max_steps=1).keys() == out.keys()
    assert trained == ["writing", "coding"]


def test_the_stages_give_a_k_way_artifact_with_one_adapter_per_persona(tmp_path, tiny_model_dir):
    """gate + distill (the stage's step) + assemble with two personas: the artifact's gate names the two
    personas in the adapters' order and the model loads with one adapter each."""
    from prism_persona.gated.model import GatedModel
    from prism_persona.stages import StageContext, get_stage
    from prism_persona.train.gate import run_gate

    cfg = _cfg(tmp_path, ["writing", "coding"])
    cfg.gate.classes = "personas"
    cfg.gate.base_queries = "off"
    cfg.model.model = str(tiny_model_dir)
    cfg.distill.epochs = 1
    run = _write_personas(cfg, {"writing": "You are a poet.", "coding": "You are a coder."})
    recs = _records("writing", "You are a poet.", 8) + _records("coding", "You are a coder.", 8)
    for i, r in enumerate(recs):
        r["label"] = int(i % 3 != 0)
    model, tok = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    run_gate(run, cfg, recs, model, tok)
    ctx = StageContext(cfg, run, model=model, tokenizer=tok, records=recs)
    get_stage("distill").function("step")(ctx.for_stage(get_stage("distill")))
    art = Artifact.read(assemble(run, cfg))
    assert art.personas == ["writing", "coding"] == art.gate().personas
    gm = GatedModel.from_pretrained(art.path, device="cpu", dtype="float32", batch_size=4)
    assert gm.state.adapters == ["writing", "coding"]
