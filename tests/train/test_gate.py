"""The gate: layer-0 features, metrics, calibration, degenerate data, save/load, the stage."""

from __future__ import annotations

import json
import random

import pytest
import torch

from prism_persona import config as C
from prism_persona.gated.features import gate_prompt, prompt_features, query_features
from prism_persona.gated.gate import GateBundle
from prism_persona.models import encode_prompts
from prism_persona.stats import auc, binary_metrics
from prism_persona.store import RunDir
from prism_persona.train.gate import calibrate_threshold, run_gate, stratified_split, train_gate


def test_features_are_layer0_states_of_last_prompt_token_without_running_later_layers(tiny_model):
    model, tok = tiny_model
    qs = ["Write a poem about the sea.", "hi", "How do I sort a list in Python quickly?"]
    feats = query_features(model, tok, qs, 16, "last")
    assert feats.shape == (3, 64)
    later = []
    hooks = [layer.register_forward_hook(lambda *a: later.append(1)) for layer in model.model.layers[1:]]
    try:
        query_features(model, tok, qs, 16, "last")
    finally:
        for h in hooks:
            h.remove()
    assert later == [], "layers after 0 must not run"
    for i, q in enumerate(qs):
        enc = encode_prompts(tok, [gate_prompt(tok, q)])
        with torch.no_grad():
            hs = model(**enc, output_hidden_states=True).hidden_states
        torch.testing.assert_close(feats[i], hs[1][0, -1], rtol=1e-5, atol=1e-5)
    # the prompt is the lone user turn with the generation prompt and the template's default system
    assert gate_prompt(tok, "hi").endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert "You are a helpful assistant." in gate_prompt(tok, "hi")


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_prompt_features_any_padding_side(tiny_model, pooling):
    model, tok = tiny_model
    texts = [gate_prompt(tok, "short"), gate_prompt(tok, "a somewhat longer query here")]
    left = encode_prompts(tok, texts)
    ids = left["input_ids"]
    mask = left["attention_mask"]
    a = prompt_features(model, ids, mask, pooling)
    # right-pad the same rows
    n = mask.sum(1)
    rid = torch.full_like(ids, tok.pad_token_id)
    rmask = torch.zeros_like(mask)
    for i in range(2):
        rid[i, : n[i]] = ids[i, -n[i] :]
        rmask[i, : n[i]] = 1
    torch.testing.assert_close(a, prompt_features(model, rid, rmask, pooling), rtol=1e-5, atol=1e-5)


def test_auc_matches_pairwise_definition():
    rng = random.Random(0)
    for _ in range(20):
        s = [rng.choice([0.1, 0.2, 0.5, 0.7, rng.random()]) for _ in range(15)]
        y = [rng.randint(0, 1) for _ in range(15)]
        pos = [a for a, b in zip(s, y) if b]
        neg = [a for a, b in zip(s, y) if not b]
        if not pos or not neg:
            assert auc(s, y) is None
            continue
        ref = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))
        assert auc(s, y) == pytest.approx(ref)
    assert auc([0.1, 0.9], [0, 1]) == 1.0 and auc([0.9, 0.1], [0, 1]) == 0.0
    assert auc([0.3, 0.4], [1, 1]) is None


def test_metrics_and_calibration():
    p = [0.1, 0.2, 0.3, 0.6, 0.7, 0.9]
    y = [0, 0, 1, 0, 1, 1]
    m = binary_metrics(p, y, 0.5)
    assert m["accuracy"] == pytest.approx(4 / 6) and m["balanced_accuracy"] == pytest.approx(2 / 3)
    one_class = binary_metrics([0.1, 0.2], [0, 0], 0.5)
    assert one_class["accuracy"] == 1.0 and one_class["balanced_accuracy"] is None and one_class["auc"] is None
    assert m["routing_rate"] == pytest.approx(0.5)
    t, how = calibrate_threshold(p, y, "balanced_accuracy")
    assert how == "balanced_accuracy"
    assert binary_metrics(p, y, t)["balanced_accuracy"] >= m["balanced_accuracy"]
    t, how = calibrate_threshold(p, y, "rate:0.5")
    assert binary_metrics(p, y, t)["routing_rate"] == pytest.approx(0.5)
    assert calibrate_threshold(p, y, "none", 0.42) == (0.42, "fixed")
    assert binary_metrics(p, y, calibrate_threshold(p, y, "rate:0")[0])["routing_rate"] == 0
    # the threshold falls between the classes (midpoint), not on a training point
    assert calibrate_threshold([0.6, 0.7, 0.8, 0.9], [0, 0, 1, 1], "balanced_accuracy")[0] == pytest.approx(0.75)
    assert calibrate_threshold([0.1, 0.999, 0.9999], [0, 1, 1], "balanced_accuracy")[0] == 0.5
    t, how = calibrate_threshold([0.2, 0.3], [1, 1], "balanced_accuracy")
    assert t == 0.5 and "one class" in how


def test_stratified_split():
    y = [1] * 8 + [0] * 24
    tr, va = stratified_split(y, 0.25, seed=3)
    assert sorted(tr + va) == list(range(32)) and not set(tr) & set(va)
    assert sum(y[i] for i in va) == 2 and len(va) == 8
    assert stratified_split([1, 0], 0.25) == ([0, 1], [])
    doms = ["a", "b", "c"] * 12
    _, va = stratified_split([0] * 36, 0.25, groups=doms)
    assert sorted(doms[i] for i in va) == ["a"] * 3 + ["b"] * 3 + ["c"] * 3


def _features(n, hidden=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hidden, generator=g)
    y = [int(v > 0) for v in (x[:, 0] + 0.3 * x[:, 1]).tolist()]
    return x, y


def test_train_gate_learns_a_separable_signal_and_saves(tmp_path):
    x, y = _features(120)
    cfg = C.GateConfig(epochs=200, hidden_sizes=[128, 64], lr=1e-3, weight_decay=1e-2)
    b = train_gate(x, y, cfg, seed=0, groups=["a", "b"] * 60)
    held = b.info["metrics"]["heldout"]
    assert held["n"] == 30 and held["auc"] > 0.9 and held["balanced_accuracy"] > 0.8
    assert set(b.info["routing_by_group"]) == {"a", "b"}
    b.save(tmp_path)
    cfgj = json.loads((tmp_path / "gate_config.json").read_text())
    assert (
        cfgj["feature_layer"] == 0
        and cfgj["hidden_size"] == 16
        and cfgj["hidden_sizes"] == [128, 64]
        and cfgj["pooling"] == "mean"
    )
    assert cfgj["threshold"] == pytest.approx(b.threshold) and "prism_version" in cfgj and cfgj["metrics"]
    b2 = GateBundle.load(tmp_path)
    torch.testing.assert_close(b2.gate(x), b.gate.eval()(x))
    assert b2.threshold == pytest.approx(b.threshold)
    lin = [m for m in b2.gate.mlp if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in lin] == [128, 64, 1]


@pytest.mark.parametrize("labels", [[0] * 10, [1] * 10, [1, 0], [1], []])
def test_degenerate_labels_fall_back_without_crashing(labels, caplog):
    x = torch.randn(len(labels), 8)
    b = train_gate(x, labels, C.GateConfig(epochs=20))
    assert 0.0 <= b.threshold <= 1.0
    assert b.info["fallbacks"] or len(set(labels)) == 2
    if labels:
        p = b.gate(x)
        assert p.shape == (len(labels),) and torch.isfinite(p).all()
    if labels == [0] * 10:
        assert not b.route(x)[1].any()
    if labels == [1] * 10:
        assert b.route(x)[1].all()


def test_run_gate_stage(tiny_model, tmp_path):
    model, tok = tiny_model
    cfg = C.resolve("tiny", overrides={"out": str(tmp_path / "run"), "persona": {"domains": ["w", "c"]}})
    recs = [
        {
            "key": f"k{i}",
            "domain": "w" if i % 2 else "c",
            "query": f"question number {i} about {'poems' if i % 2 else 'code'}",
            "label": i % 2,
        }
        for i in range(16)
    ]
    run = RunDir(cfg.out)
    info = run_gate(run, cfg, recs, model, tok)
    assert run.done("gate") and (run.path("gate") / "gate.safetensors").is_file()
    assert info["n_heldout"] == 4 and set(info["routing_by_domain"]) == {"w", "c"}
    assert info["metrics"]["heldout"]["accuracy"] is not None
    # the abstain region (gate.ood default) is fitted on the 8 routed queries and saved with the gate
    assert info["ood"]["method"] == "mahalanobis" and info["ood"]["reference"] == "routed"
    from prism_persona.gated.gate import GateBundle

    assert GateBundle.load(run.path("gate")).gate.ood.limit == pytest.approx(info["ood"]["threshold"])
    again = run_gate(run, cfg, recs, None, None)  # done: skipped, no model needed
    assert again.pop("stage") == "gate" and again == info


def test_calibration_is_bounded_and_falls_back_on_small_splits(caplog):
    from prism_persona.train.gate import calibrate_threshold

    # the only separating threshold is tiny (the 2.5e-16): clipped into the bounds, with a warning
    t, how = calibrate_threshold([1e-16, 4e-16, 0.3, 0.6], [0, 1, 1, 1], "balanced_accuracy", bounds=(0.05, 0.95))
    assert t == 0.05 and "clipped from" in how and "threshold_bounds" in caplog.text
    # too few rows of one label: not calibrated, the documented fixed threshold is used
    t, how = calibrate_threshold([0.1, 0.2, 0.9], [0, 0, 1], "balanced_accuracy", default=0.5, min_rows=2)
    assert t == 0.5 and how.startswith("fixed: too few held-out rows (1 positive, 2 negative)")
    assert calibrate_threshold([0.2, 0.99], [0, 1], "rate:0", bounds=(0.05, 0.95))[0] == 0.95


def test_targets_weights_and_near_duplicate_split():
    from prism_persona.train.gate import gate_targets, near_duplicate_clusters, sample_weights

    recs = [
        {"label": 1, "winner": "persona"},
        {"label": 0, "winner": "base"},
        {"label": 0, "winner": "tie"},
        {"label": 0, "winner": "mixed"},
    ]
    assert gate_targets(recs, "win") == [1.0, 0.0, 0.0, 0.0]
    assert gate_targets(recs, "preference") == [1.0, 0.0, 0.5, 0.5]
    two = [dict(r, domain=d) for r, d in zip(recs, ["a", "a", "b", "b"])]  # win rates: a 0.5, b 0
    assert gate_targets(two, "win", domain_prior=0.5) == [0.75, 0.25, 0.0, 0.0]
    assert gate_targets(two, "win", domain_prior=1.0) == [0.5, 0.5, 0.0, 0.0]
    w = sample_weights([1, 0, 0, 0, 0, 0], ["a", "a", "a", "b", "b", "b"], "domain")
    # cells (a,1) x1, (a,0) x2, (b,0) x3 weigh the same in total
    assert float(w[0]) == pytest.approx(2 * float(w[1])) == pytest.approx(3 * float(w[3]))
    assert float(w.mean()) == pytest.approx(1.0)
    texts = [
        "How do I bake bread at home?",
        "how do i bake bread at home",
        "How do I bake bread at home today?",
        "What herbs go well with salmon?",
        "Tell me a story about a turtle.",
    ]
    c = near_duplicate_clusters(texts, 0.8)
    assert c[0] == c[1] == c[2] and len({c[0], c[3], c[4]}) == 3
    labels = [0] * 12
    clusters = [i // 3 if i < 6 else 100 + i for i in range(12)]  # two clusters of 3, six singletons
    for seed in range(5):
        tr, va = stratified_split(labels, 0.25, seed, clusters=clusters)
        assert sorted(tr + va) == list(range(12)) and va
        for k in (0, 1):
            members = {i for i in range(12) if clusters[i] == k}
            assert members <= set(tr) or members <= set(va)


def test_gate_early_stops_and_keeps_the_best_epoch():
    x, _ = _features(80, hidden=32)
    y = [random.Random(i).randint(0, 1) for i in range(80)]  # noise: the held-out loss soon rises
    cfg = C.GateConfig(epochs=400, patience=5)
    b = train_gate(x, y, cfg, seed=0, groups=["a", "b"] * 40)
    assert 1 <= b.info["best_epoch"] <= b.info["epochs_run"] < 400
    assert b.info["epochs_run"] - b.info["best_epoch"] == 5
    assert b.info["pooling"] == "mean" and "in-distribution" in b.info["metrics_note"]
