"""The gated model: routing inside the prefill, equivalence with the base and PEFT models."""

from __future__ import annotations

import json

import pytest
import torch

from prism_persona.engines.base import SamplingParams
from prism_persona.engines.hf import HFEngine
from prism_persona.gated.artifact import write_artifact
from prism_persona.gated.features import gate_prompt, query_features
from prism_persona.gated.gate import Gate, GateBundle
from prism_persona.gated.layers import GatedLoRALinear
from prism_persona.gated.model import GatedModel
from prism_persona.models import encode_prompts, load_model, render_chat

QUERIES = [
    "Write a haiku about autumn rain.",
    "Fix this Python: print 'hi'",
    "How do I pick a lock?",
    "Summarise the plot of Hamlet in two sentences, please.",
    "What is 2+2?",
    "Explain recursion to a child using a story about nested boxes.",
]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _load(model_dir):
    return load_model(str(model_dir), dtype="float32", device="cpu")


def make_adapter(model_dir, out, r=4, seed=1, targets=TARGETS, alpha=None, b_std=0.05):
    """A PEFT LoRA adapter on ``targets`` of layers 1..L-1 with random (non-zero) A and B (alpha 2r
    unless given; B drawn with std ``b_std``)."""
    from peft import LoraConfig, get_peft_model

    base, _ = _load(model_dir)
    n = base.config.num_hidden_layers
    cfg = LoraConfig(
        r=r,
        lora_alpha=2 * r if alpha is None else alpha,
        lora_dropout=0.0,
        target_modules=list(targets),
        layers_to_transform=list(range(1, n)),
        init_lora_weights=False,
    )
    torch.manual_seed(seed)
    pm = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, b_std)
    pm.save_pretrained(out)
    return out


def make_mixed_gate(model_dir, queries=QUERIES, seed=0):
    """A random gate whose threshold routes about half of ``queries``."""
    model, tok = _load(model_dir)
    feats = query_features(model, tok, queries, 16, "last")
    torch.manual_seed(seed)
    gate = Gate(feats.shape[1], [128, 64], dropout=0.0, pooling="last")
    gate.set_standardisation(feats)
    gate.eval()
    probs = gate(feats).detach().sort().values
    thr = float((probs[len(probs) // 2 - 1] + probs[len(probs) // 2]) / 2)
    return GateBundle(gate=gate, threshold=thr, info={"metrics": {}})


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tiny_model_dir, tiny_qwen_dir, tmp_path_factory):
    model_dir = tiny_model_dir if request.param == "llama" else tiny_qwen_dir
    root = tmp_path_factory.mktemp(f"art-{request.param}")
    adapter = make_adapter(model_dir, root / "adapter-src")
    gate = make_mixed_gate(model_dir)
    art = write_artifact(root / "prism", model_spec=str(model_dir), gate=gate, adapter_dir=adapter)
    gm = GatedModel.from_pretrained(art, device="cpu", dtype="float32", batch_size=4)
    return {"dir": model_dir, "art": art, "gm": gm, "gate": gate}


def _batch(tok, queries):
    return encode_prompts(tok, [gate_prompt(tok, q) for q in queries])


def _real_positions(mask):
    return mask.bool()


def test_artifact_layout_and_layers(setup):
    art, gm = setup["art"], setup["gm"]
    cfg = json.loads((art / "prism_config.json").read_text())
    assert cfg["base_model"] == str(setup["dir"])
    assert (art / "gate.safetensors").is_file() and (art / "adapter" / "adapter_config.json").is_file()
    gcfg = json.loads((art / "gate_config.json").read_text())
    assert gcfg["feature_layer"] == 0 and gcfg["hidden_size"] == 64
    n_layers = gm.model.config.num_hidden_layers
    # every target of layers 1..L-1 is gated; layer 0 is untouched
    assert len(gm.lora_modules) == len(TARGETS) * (n_layers - 1)
    assert not any(".layers.0." in n for n in gm.lora_modules)
    assert not any(isinstance(m, GatedLoRALinear) for m in gm.model.model.layers[0].modules())


def test_prefill_feature_equals_training_feature(setup):
    """The gate's input inside a left-padded prefill == the training feature of each query alone."""
    gm = setup["gm"]
    base, tok = _load(setup["dir"])
    train_feats = torch.cat([query_features(base, tok, [q], 16, "last") for q in QUERIES])
    enc = _batch(gm.tokenizer, QUERIES)
    assert (enc["attention_mask"] == 0).any(), "the batch must contain left padding"
    _, probs, _ = gm.forward_logits(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(gm.state.features, train_feats, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(probs, setup["gate"].gate(train_feats), rtol=1e-4, atol=1e-5)
    # generate(): same features, via the hook during model.generate's prefill
    outs = gm.generate([[{"role": "user", "content": q}] for q in QUERIES], SamplingParams(max_new_tokens=2))
    got = torch.tensor([c.meta["gate_prob"] for c in outs])
    torch.testing.assert_close(got, probs, rtol=1e-4, atol=1e-5)
    assert [c.meta["routed"] for c in outs] == [bool(p >= gm.threshold) for p in probs]


def test_routed_off_rows_equal_base_and_on_rows_equal_peft(setup):
    from peft import PeftModel

    gm = setup["gm"]
    base, tok = _load(setup["dir"])
    peft_base, _ = _load(setup["dir"])
    peft = PeftModel.from_pretrained(peft_base, str(setup["art"] / "adapter")).eval()
    enc = _batch(tok, QUERIES)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    real = _real_positions(mask)
    with torch.no_grad():
        ref_base = base(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        ref_peft = peft(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    logits, probs, routed = gm.forward_logits(ids, mask)
    assert 0 < int(routed.sum()) < len(QUERIES), "the test gate must give a mixed batch"
    for i in range(len(QUERIES)):
        ref = ref_peft if routed[i] else ref_base
        torch.testing.assert_close(logits[i][real[i]], ref[i][real[i]], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ref_base[0][real[0]], ref_peft[0][real[0]], atol=1e-3), "adapter must matter"
    off, _, r_off = gm.forward_logits(ids, mask, force=False)
    on, _, r_on = gm.forward_logits(ids, mask, force=True)
    assert not r_off.any() and r_on.all()
    torch.testing.assert_close(off[real], ref_base[real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(on[real], ref_peft[real], rtol=1e-4, atol=1e-4)


def test_mixed_batch_equals_each_row_alone(setup):
    gm = setup["gm"]
    enc = _batch(gm.tokenizer, QUERIES)
    logits, _, routed = gm.forward_logits(enc["input_ids"], enc["attention_mask"])
    assert 0 < int(routed.sum()) < len(QUERIES)
    for i, q in enumerate(QUERIES):
        one = _batch(gm.tokenizer, [q])
        alone, _, r1 = gm.forward_logits(one["input_ids"], one["attention_mask"])
        assert bool(r1[0]) == bool(routed[i])
        n = int(one["attention_mask"].sum())
        torch.testing.assert_close(logits[i, -n:], alone[0], rtol=1e-4, atol=1e-4)


def test_force_per_row_overrides_gate(setup):
    gm = setup["gm"]
    enc = _batch(gm.tokenizer, QUERIES[:3])
    _, probs, routed = gm.forward_logits(enc["input_ids"], enc["attention_mask"], force=[True, False, None])
    assert routed.tolist()[:2] == [True, False]
    assert bool(routed[2]) == bool(probs[2] >= gm.threshold)


def test_all_off_batch_skips_the_lora_delta(setup, monkeypatch):
    gm = setup["gm"]
    calls = []
    orig = GatedLoRALinear.delta
    monkeypatch.setattr(GatedLoRALinear, "delta", lambda self, x, name: calls.append(x.shape[0]) or orig(self, x, name))
    enc = _batch(gm.tokenizer, QUERIES)
    gm.forward_logits(enc["input_ids"], enc["attention_mask"], force=False)
    assert calls == []
    gm.forward_logits(enc["input_ids"], enc["attention_mask"], force=[True] + [False] * (len(QUERIES) - 1))
    assert calls and set(calls) == {1}, "mixed batches compute the delta for the routed rows only"


def test_greedy_generate_force_off_equals_base(setup):
    gm = setup["gm"]
    base, tok = _load(setup["dir"])
    chats = [[{"role": "user", "content": q}] for q in QUERIES]
    params = SamplingParams(max_new_tokens=12)
    ref = HFEngine(base, tok, batch_size=4, quiet=True).generate(chats, params)
    got = gm.generate(chats, params, force=False)
    assert [c.text for c in got] == [c.text for c in ref]
    assert all(c.meta["routed"] is False and 0.0 <= c.meta["gate_prob"] <= 1.0 for c in got)
    on = gm.generate(chats, params, force=True)
    assert [c.text for c in on] != [c.text for c in ref]


def test_generate_routed_rows_match_peft_generate(setup):
    from peft import PeftModel

    gm = setup["gm"]
    peft_base, tok = _load(setup["dir"])
    peft = PeftModel.from_pretrained(peft_base, str(setup["art"] / "adapter")).eval()
    chats = [[{"role": "user", "content": q}] for q in QUERIES]
    params = SamplingParams(max_new_tokens=10)
    ref = HFEngine(peft, tok, batch_size=4, quiet=True).generate(chats, params)
    got = gm.generate(chats, params, force=True)
    assert [c.text for c in got] == [c.text for c in ref]


def test_multi_turn_routes_from_first_user_turn(setup):
    gm = setup["gm"]
    q = QUERIES[3]
    ((p_first, r_first),) = gm.route([[{"role": "user", "content": q}]])
    chat = [
        {"role": "user", "content": q},
        {"role": "assistant", "content": "Sure."},
        {"role": "user", "content": "And shorter?"},
    ]
    with_system = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": q}]
    outs = gm.generate([chat, with_system], SamplingParams(max_new_tokens=3))
    for c in outs:
        assert c.meta["gate_prob"] == pytest.approx(p_first, abs=1e-5)
        assert c.meta["routed"] == r_first
    assert gm.route([chat])[0][0] == pytest.approx(p_first, abs=1e-5)


def test_engine_view_and_scoring(setup):
    gm = setup["gm"]
    eng = gm.as_engine(force=True)
    assert eng.can_score
    chats = [[{"role": "user", "content": q}] for q in QUERIES[:2]]
    out = eng.generate(chats, SamplingParams(max_new_tokens=3))
    assert all(set(c.meta) == {"routed", "gate_prob", "persona", "persona_prob"} and c.meta["routed"] for c in out)
    scores = eng.score_choices(chats, ["A", "B"])
    assert len(scores) == 2 and all(set(s) == {"A", "B"} and s["A"] < 0 for s in scores)
    enc = encode_prompts(gm.tokenizer, [render_chat(gm.tokenizer, c) for c in chats])
    logits, _, _ = gm.forward_logits(enc["input_ids"], enc["attention_mask"], force=True)
    a_id = gm.tokenizer("A", add_special_tokens=False)["input_ids"][0]
    lp = torch.log_softmax(logits[0, -1], -1)
    assert scores[0]["A"] >= float(lp[a_id]) - 1e-5


@pytest.mark.slow
def test_embedded_model_routing_and_step0_kl(embedded_model, tmp_path):
    """On the real SmolLM2: a persona-conditioned teacher gives a clearly non-zero step-0 KL (0 without
    the persona), and the gated model reproduces base and PEFT behaviour with routing in the prefill."""
    import copy

    from peft import PeftModel

    from prism_persona import config as C
    from prism_persona.train.distill import attach_lora, build_examples, distill_loss

    base, tok = embedded_model
    cfg = C.resolve("tiny", overrides={"distill": {"loss": "kl"}})  # the step-0 KL itself (the preset adds CE)
    recs = [
        {
            "key": "a",
            "query": "Give me one tip for writing a strong opening line.",
            "label": 1,
            "persona": "You are an award-winning novelist and writing coach who answers with vivid, concrete advice.",
            "placement": "system",
            "persona_answer": "Start in the middle of action: drop the reader into a moment of tension.",
        },
        {
            "key": "b",
            "query": "How do I reverse a list in Python?",
            "label": 1,
            "persona": "You are a senior Python engineer who answers with short, idiomatic code and one-line explanations.",
            "placement": "user",
            "persona_answer": "Use slicing: `xs[::-1]` returns a reversed copy; `xs.reverse()` works in place.",
        },
    ]
    student = attach_lora(copy.deepcopy(base), cfg.distill)
    with torch.no_grad():
        kl = float(distill_loss(student, build_examples(tok, recs, 256), cfg.distill, tok.pad_token_id))
        kl_bug = float(
            distill_loss(student, build_examples(tok, recs, 256, teacher_persona=False), cfg.distill, tok.pad_token_id)
        )
    print(f"step-0 KL with persona {kl:.4f}, without {kl_bug:.2e}")
    assert kl > 0.05 and kl_bug < 1e-4
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    student.save_pretrained(tmp_path / "adapter")
    queries = [r["query"] for r in recs] + ["What is the capital of France?"]
    feats = query_features(base, tok, queries, 16, "last")
    torch.manual_seed(0)
    gate = Gate(feats.shape[1], [128, 64], dropout=0.0, pooling="last")
    gate.set_standardisation(feats)
    gate.eval()
    art = write_artifact(
        tmp_path / "prism", model_spec=None, gate=GateBundle(gate, 0.5, {}), adapter_dir=tmp_path / "adapter"
    )
    assert json.loads((art / "prism_config.json").read_text())["base_model"] == "smollm2-135m-instruct"
    gm = GatedModel.from_pretrained(art, base=(copy.deepcopy(base), tok), batch_size=3)
    enc = _batch(tok, queries)
    logits, probs, _ = gm.forward_logits(enc["input_ids"], enc["attention_mask"], force=[False, True, None])
    torch.testing.assert_close(gm.state.features, feats, rtol=1e-4, atol=1e-4)
    real = enc["attention_mask"].bool()
    peft = PeftModel.from_pretrained(copy.deepcopy(base), str(art / "adapter")).eval()
    pos = (enc["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        ref_b = base(**enc, position_ids=pos).logits
        ref_p = peft(**enc, position_ids=pos).logits
    torch.testing.assert_close(logits[0][real[0]], ref_b[0][real[0]], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(logits[1][real[1]], ref_p[1][real[1]], rtol=1e-3, atol=1e-3)
    chats = [[{"role": "user", "content": q}] for q in queries]
    params = SamplingParams(max_new_tokens=16)
    ref = HFEngine(base, tok, batch_size=3, quiet=True).generate(chats, params)
    assert [c.text for c in gm.generate(chats, params, force=False)] == [c.text for c in ref]


def test_route_runs_layer0_only_and_leaves_the_flags_alone(setup):
    gm = setup["gm"]
    enc = _batch(gm.tokenizer, QUERIES[:3])
    _, probs, _ = gm.forward_logits(enc["input_ids"], enc["attention_mask"], force=[True, False, True])
    before = gm.state.routed.clone()
    later = []
    hooks = [layer.register_forward_hook(lambda *a: later.append(1)) for layer in gm.model.model.layers[1:]]
    try:
        res = gm.route([[{"role": "user", "content": q}] for q in QUERIES[:3]])
    finally:
        for h in hooks:
            h.remove()
    assert later == [] and torch.equal(gm.state.routed, before)
    assert [p for p, _ in res] == pytest.approx(probs.tolist(), abs=1e-5)
    assert [r for _, r in res] == [p >= gm.threshold for p in probs.tolist()]


def test_public_routing_context_for_custom_decoders(setup):
    gm = setup["gm"]
    enc = _batch(gm.tokenizer, QUERIES[:2])
    with gm.routing([None, True]) as state:
        gm.model(**enc)  # prefill: decides
        first = state.routed.clone()
        gm.model(input_ids=enc["input_ids"][:, -1:], attention_mask=enc["attention_mask"])  # decode-like step
        assert torch.equal(state.routed, first) and bool(first[1])
