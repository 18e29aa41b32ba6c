"""One adapter per persona: each row gets at most one adapter, computed on its own rows only; the
artifact is PEFT's multi-adapter directory; routed rows equal PEFT with that adapter set."""

from __future__ import annotations

import json

import pytest
import torch

from prism_persona.errors import PrismError
from prism_persona.gated.artifact import Artifact, write_artifact
from prism_persona.gated.export import export
from prism_persona.gated.features import gate_prompt
from prism_persona.gated.layers import GatedLoRALinear, RoutingState, install_adapters
from prism_persona.gated.model import GatedModel
from prism_persona.models import encode_prompts, load_model

from .test_gated import QUERIES, TARGETS, make_adapter, make_mixed_gate

NAMES = ["story", "monitor", "coder"]


def _load(model_dir):
    return load_model(str(model_dir), dtype="float32", device="cpu")


def _make_partial_adapter(model_dir, out, seed):
    """An adapter of another rank on a subset of the modules (q_proj, v_proj) of layers 1..L-1."""
    return make_adapter(model_dir, out, r=2, seed=seed, targets=["q_proj", "v_proj"], alpha=6, b_std=0.1)


@pytest.fixture(scope="module")
def multi(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    sources = [
        make_adapter(tiny_model_dir, root / "a0", r=4, seed=1),
        make_adapter(tiny_model_dir, root / "a1", r=8, seed=2),
        _make_partial_adapter(tiny_model_dir, root / "a2", seed=3),
    ]
    gate = make_kway_gate(tiny_model_dir, NAMES[::-1])  # the gate's persona order differs from the adapters'
    art = write_artifact(root / "prism", model_spec=str(tiny_model_dir), gate=gate, adapters=list(zip(NAMES, sources)))
    return {"dir": tiny_model_dir, "art": art, "sources": sources, "gate": gate}


def make_kway_gate(model_dir, names, seed=0):
    """A random K-way gate (K = len(names)) over ``names``: its rows spread over the personas."""
    from prism_persona.gated.features import query_features
    from prism_persona.gated.gate import Gate, GateBundle
    from prism_persona.models import load_model

    model, tok = load_model(str(model_dir), dtype="float32", device="cpu")
    feats = query_features(model, tok, QUERIES, 16, "last")
    torch.manual_seed(seed)
    gate = Gate(feats.shape[1], [], dropout=0.0, pooling="last", personas=len(names))
    gate.set_standardisation(feats)
    with torch.no_grad():
        gate.mlp[-1].weight.normal_(0, 1.0)
    gate.eval()
    return GateBundle(gate=gate, threshold=0.5, info={"personas": [{"name": n} for n in names]})


def _batch(tok, queries):
    enc = encode_prompts(tok, [gate_prompt(tok, q) for q in queries])
    ids, mask = enc["input_ids"], enc["attention_mask"]
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


def _peft_multi(model_dir, adapter_root):
    """PEFT's own loading of the artifact's directory: root = first persona, sub-folders = the others."""
    from peft import PeftModel

    base, _ = _load(model_dir)
    pm = PeftModel.from_pretrained(base, str(adapter_root))  # adapter "default" = NAMES[0]
    for name in NAMES[1:]:
        pm.load_adapter(str(adapter_root / name), adapter_name=name)
    return pm.eval()


def test_artifact_is_peft_multi_adapter_layout(multi, tmp_path):
    art = multi["art"]
    cfg = json.loads((art / "prism_config.json").read_text())
    assert cfg["personas"] == NAMES
    read = Artifact.read(art)
    assert read.personas == NAMES
    assert read.adapters == [(NAMES[0], art / "adapter")] + [(n, art / "adapter" / n) for n in NAMES[1:]]
    # the same files PEFT's save_pretrained writes for these adapters (default at the root, others by name)
    pm = _peft_multi(multi["dir"], art / "adapter")
    pm.save_pretrained(tmp_path / "peft-saved")

    def files(root):  # the adapter files (PEFT writes its model card README.md at the root only)
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("adapter_*"))

    listing, ours = files(tmp_path / "peft-saved"), files(art / "adapter")
    assert ours == listing
    assert "monitor/adapter_model.safetensors" in ours


def test_each_routed_row_equals_peft_with_its_adapter_and_unrouted_rows_equal_base(multi):
    model, tok = _load(multi["dir"])
    state = RoutingState()
    read = Artifact.read(multi["art"])
    installed = install_adapters(model, read.adapters, state)
    assert len(installed) == len(TARGETS) * (model.config.num_hidden_layers - 1)
    assert state.adapters == NAMES
    model.eval()
    ids, mask, pos = _batch(tok, QUERIES)
    persona = torch.tensor([0, -1, 1, 2, 0, 1])
    state.set(persona >= 0, persona=persona)
    real = mask.bool()
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    base, _ = _load(multi["dir"])
    pm = _peft_multi(multi["dir"], multi["art"] / "adapter")
    refs = {}
    with torch.no_grad():
        refs[-1] = base(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        for k, name in enumerate(NAMES):
            pm.set_adapter("default" if k == 0 else name)
            refs[k] = pm(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    for i, k in enumerate(persona.tolist()):
        torch.testing.assert_close(got[i][real[i]], refs[k][i][real[i]], rtol=0, atol=1e-5)
    for k in range(len(NAMES)):  # every adapter changes the logits, so the comparison above means something
        assert not torch.allclose(refs[k][0][real[0]], refs[-1][0][real[0]], atol=1e-3)
    assert not torch.allclose(refs[0][0][real[0]], refs[1][0][real[0]], atol=1e-3)


def test_each_adapter_runs_on_its_own_rows_only_and_no_routed_row_costs_nothing(multi, monkeypatch):
    model, tok = _load(multi["dir"])
    base, _ = _load(multi["dir"])
    state = RoutingState()
    install_adapters(model, Artifact.read(multi["art"]).adapters, state)
    model.eval()
    calls = []
    orig = GatedLoRALinear.delta
    monkeypatch.setattr(
        GatedLoRALinear, "delta", lambda self, x, name: calls.append((name, x.shape[0])) or orig(self, x, name)
    )
    lora_calls = []
    for m in model.modules():
        if isinstance(m, GatedLoRALinear):
            for a in m.lora_A.values():
                a.register_forward_hook(lambda *_: lora_calls.append(1))
    ids, mask, pos = _batch(tok, QUERIES)
    state.set(torch.zeros(len(QUERIES), dtype=torch.bool), persona=torch.tensor([0, 1, 2, 0, 1, 2]))
    with torch.no_grad():
        off = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        ref = base(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert calls == [] and lora_calls == [], "a batch with no routed row runs no LoRA matmul"
    assert torch.equal(off, ref), "and returns exactly the base model's logits"

    state.set(torch.ones(6, dtype=torch.bool), persona=torch.tensor([1, -1, 1, 2, -1, 1]))
    assert state.routed.tolist() == [True, False, True, True, False, True]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=pos)
    per_adapter = {}
    for name, rows in calls:
        per_adapter.setdefault(name, set()).add(rows)
    assert per_adapter == {"monitor": {3}, "coder": {1}}, "each adapter's delta on its own rows, none for story"
    n_layers = model.config.num_hidden_layers - 1
    assert sum(1 for n, _ in calls if n == "coder") == 2 * n_layers  # the partial adapter: q_proj, v_proj only
    assert sum(1 for n, _ in calls if n == "monitor") == len(TARGETS) * n_layers


def test_routing_state_persona_rules():
    st = RoutingState()
    st.adapters = ["a", "b"]
    st.set(torch.tensor([True, False, True]))  # no persona: adapter 0 for routed rows (one adapter's behaviour)
    assert st.persona.tolist() == [0, -1, 0] and st.groups[0][0] == 0 and st.groups[0][1].tolist() == [0, 2]
    st.set(torch.tensor([True, True]), persona=torch.tensor([1, 1]))
    assert st.all_on and st.groups == [(1, None)]  # one adapter with every row: no gather
    with pytest.raises(ValueError, match="persona index 2"):
        st.set(torch.tensor([True]), persona=torch.tensor([2]))
    with pytest.raises(ValueError, match="shape"):
        st.set(torch.tensor([True, True]), persona=torch.tensor([0]))


def test_gated_model_loads_every_adapter_and_routes_each_row_to_its_personas_adapter(multi):
    """The K-way gate's persona k (its own order) reaches the adapter of that name (the artifact's order)."""
    gm = GatedModel.from_pretrained(multi["art"], device="cpu", dtype="float32", batch_size=8)
    assert gm.state.adapters == NAMES
    ids, mask, _ = _batch(gm.tokenizer, QUERIES)
    _, _, routed = gm.forward_logits(ids, mask, force=True)
    assert routed.all()
    gate_names = multi["gate"].personas
    want = [NAMES.index(gate_names[int(p)]) for p in gm.persona]
    assert gm.state.persona.tolist() == want and len(set(want)) > 1  # several adapters in one batch


def test_adapters_the_gate_does_not_name_are_refused_at_load(multi, tmp_path):
    from prism_persona.gated.model import adapter_index

    with pytest.raises(ValueError, match="need a K-way gate; this gate is binary"):
        adapter_index(make_mixed_gate(multi["dir"]), NAMES)
    with pytest.raises(ValueError, match="the gate's persona 'pirate' has no adapter"):
        adapter_index(make_kway_gate(multi["dir"], ["story", "pirate", "coder"]), NAMES)
    assert adapter_index(make_mixed_gate(multi["dir"]), ["default"]) is None  # one adapter: every routed row


def test_one_adapter_artifact_is_unchanged(multi, tmp_path):
    art = write_artifact(
        tmp_path / "one", model_spec=str(multi["dir"]), gate=multi["gate"], adapter_dir=multi["sources"][0]
    )
    cfg = json.loads((art / "prism_config.json").read_text())
    assert "personas" not in cfg and cfg["adapter"] == "adapter"
    assert sorted(p.name for p in (art / "adapter").iterdir()) == sorted(
        p.name for p in multi["sources"][0].iterdir() if p.name not in ("optimizer.pt", "trainer_state.json")
    )
    assert Artifact.read(art).adapters == [("default", art / "adapter")]


def _broken(multi, tmp_path, edit):
    import shutil

    dst = tmp_path / "broken"
    shutil.copytree(multi["art"], dst)
    edit(dst)
    return dst


def _set_personas(value):
    def edit(d):
        cfg = json.loads((d / "prism_config.json").read_text())
        cfg["personas"] = value
        (d / "prism_config.json").write_text(json.dumps(cfg))

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (_set_personas(["story", "../x"]), "not a persona name"),
        (_set_personas(["story", "story"]), "twice"),
        (_set_personas(["story", "default"]), "only the first persona"),
        (_set_personas("story"), "non-empty list"),
        (lambda d: (d / "adapter" / "coder" / "adapter_config.json").unlink(), "no LoRA adapter"),
        (lambda d: (d / "adapter" / "monitor" / "adapter_model.safetensors").write_bytes(b"junk"), "safetensors"),
    ],
)
def test_every_adapter_is_checked(multi, tmp_path, edit, message):
    with pytest.raises(PrismError, match=message) as err:
        Artifact.read(_broken(multi, tmp_path, edit))
    assert "\n" not in str(err.value)


def test_nan_in_a_later_adapter_is_refused(multi, tmp_path):
    from safetensors.torch import load_file, save_file

    def poison(d):
        f = d / "adapter" / "monitor" / "adapter_model.safetensors"
        w = load_file(str(f))
        key = next(k for k in w if "lora_A" in k)
        w[key][0, 0] = float("nan")
        save_file(w, str(f))

    with pytest.raises(PrismError, match="NaN"):
        Artifact.read(_broken(multi, tmp_path, poison))


def test_export_writes_one_vllm_adapter_per_persona(multi, tmp_path):
    out = export(multi["art"], tmp_path / "vllm")
    for rel in ["adapter", "adapter/monitor", "adapter/coder"]:
        cfg = json.loads((out / rel / "adapter_config.json").read_text())
        assert "layers_to_transform" not in cfg and (out / rel / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter" / "coder" / "adapter_config.json").read_text())["target_modules"] == [
        "q_proj",
        "v_proj",
    ]
    readme = (out / "README.md").read_text()
    assert "--max-loras 3" in readme and f"monitor={(out / 'adapter' / 'monitor').resolve()}" in readme
