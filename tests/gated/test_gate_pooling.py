"""The mean-pooled gate feature: computed inside the prefill exactly as in training, on every path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from prism_persona.engines.base import SamplingParams
from prism_persona.gated.features import gate_prompt, pool_states, query_features
from prism_persona.gated.gate import Gate, GateBundle
from prism_persona.gated.model import GatedModel
from prism_persona.models import encode_prompts, load_model

QUERIES = [
    "Write a haiku about autumn rain.",
    "hi",
    "How do I sort a list in Python quickly, please?",
    "Tell me a story about a brave little turtle who crosses the sea.",
]


def test_pool_states_any_padding_side_and_bad_name():
    h = torch.randn(2, 5, 3)
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    hr = h.clone()
    hr[0, :3] = h[0, 2:]
    torch.testing.assert_close(pool_states(h, left, "mean"), pool_states(hr, right, "mean"))
    torch.testing.assert_close(pool_states(h, left, "mean")[0], h[0, 2:].mean(0))
    torch.testing.assert_close(pool_states(h, left, "last"), pool_states(hr, right, "last"))
    torch.testing.assert_close(pool_states(h, None, "mean"), h.mean(1))
    # a mask wider than the states (a static cache's prefill mask) is cut to the prompt
    wide = torch.cat([left, torch.ones(2, 4, dtype=torch.long)], 1)
    torch.testing.assert_close(pool_states(h, wide, "mean"), pool_states(h, left, "mean"))
    with pytest.raises(ValueError, match="unknown gate pooling"):
        pool_states(h, left, "max")


def test_mean_feature_is_the_mean_of_layer0_states_over_real_tokens(tiny_model):
    model, tok = tiny_model
    feats = query_features(model, tok, QUERIES, 16, "mean")
    for i, q in enumerate(QUERIES):
        enc = encode_prompts(tok, [gate_prompt(tok, q)])
        with torch.no_grad():
            hs = model(**enc, output_hidden_states=True).hidden_states
        torch.testing.assert_close(feats[i], hs[1][0].mean(0), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(feats, query_features(model, tok, QUERIES, 16, "last"))


@pytest.fixture
def mean_gated(tiny_model_dir, tmp_path):
    model, tok = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    feats = query_features(model, tok, QUERIES, 16, "mean")
    torch.manual_seed(0)
    gate = Gate(feats.shape[1], [8], dropout=0.0, pooling="mean")
    gate.set_standardisation(feats)
    gate.eval()
    probs = gate(feats).detach().sort().values
    bundle = GateBundle(gate=gate, threshold=float((probs[1] + probs[2]) / 2), info={})
    bundle.save(tmp_path / "gate")
    loaded = GateBundle.load(tmp_path / "gate")
    assert loaded.gate.pooling == "mean"
    return GatedModel.from_parts(model, tok, loaded, batch_size=4), feats


def test_mean_gate_routes_inside_the_prefill_as_trained(mean_gated):
    gm, train_feats = mean_gated
    alone = torch.cat([query_features(gm.model, gm.tokenizer, [q], 16, "mean") for q in QUERIES])
    torch.testing.assert_close(alone, train_feats, rtol=1e-4, atol=1e-5)
    want = gm.gate(train_feats)
    # forward_logits on a left-padded batch
    enc = encode_prompts(gm.tokenizer, [gate_prompt(gm.tokenizer, q) for q in QUERIES])
    assert (enc["attention_mask"] == 0).any()
    _, probs, routed = gm.forward_logits(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(probs, want, rtol=1e-4, atol=1e-5)
    assert 0 < int(routed.sum()) < len(QUERIES)
    # generate(): model.generate's prefill (left padded, mask passed as a keyword)
    outs = gm.generate([[{"role": "user", "content": q}] for q in QUERIES], SamplingParams(max_new_tokens=2))
    torch.testing.assert_close(torch.tensor([c.meta["gate_prob"] for c in outs]), want, rtol=1e-4, atol=1e-5)
    # route(): the layer-0-only pass for chats that are not a lone user turn
    got = [p for p, _ in gm.route([[{"role": "user", "content": q}] for q in QUERIES])]
    torch.testing.assert_close(torch.tensor(got), want, rtol=1e-4, atol=1e-5)


def test_mean_gate_on_the_static_cache_decoder(mean_gated):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from fastgen import DecodeSettings, generate_gated  # benchmarks/fastgen.py

    gm, train_feats = mean_gated
    enc = encode_prompts(gm.tokenizer, [gate_prompt(gm.tokenizer, q) for q in QUERIES])
    _, _, probs = generate_gated(
        gm, enc["input_ids"], enc["attention_mask"], DecodeSettings(max_new_tokens=3), compile=False
    )
    torch.testing.assert_close(torch.tensor(probs), gm.gate(train_feats), rtol=1e-4, atol=1e-5)


def test_artifacts_without_a_pooling_entry_load_as_last_token(tmp_path):
    import json

    gate = Gate(4, [], dropout=0.0, pooling="last")
    GateBundle(gate=gate).save(tmp_path)
    cfg = json.loads((tmp_path / "gate_config.json").read_text())
    assert cfg["pooling"] == "last"
    del cfg["pooling"]
    (tmp_path / "gate_config.json").write_text(json.dumps(cfg))
    assert GateBundle.load(tmp_path).gate.pooling == "last"
