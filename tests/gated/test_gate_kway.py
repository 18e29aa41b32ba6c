"""The K-way gate (issue 29): base + one class per persona on the layer-0 feature, calibrated by
temperature scaling, with the persona per row in :func:`prism_persona.gated.gate.decide`; K = 1 is the
binary gate of before (checked against a gate the code before the K-way gate wrote,
``tests/fixtures/binary_gate_e846ee5``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from prism_persona.config import GateConfig
from prism_persona.gated.gate import GATE_CONFIG, GATE_WEIGHTS, Gate, GateBundle, decide, routing_probability
from prism_persona.testing import one_error_line
from prism_persona.train.gate import (
    calibrate_temperature,
    expected_calibration_error,
    plot_reliability,
    run_personas,
    top_label,
    train_gate,
    train_gate_on_records,
)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "binary_gate_e846ee5"
DIM = 8


def binary_run(n: int = 48, seed: int = 0):
    """A deterministic binary run: features whose first coordinate carries the label (with noise),
    two domains, distinct texts. The fixture gate was trained on exactly this by the code before."""
    g = torch.Generator().manual_seed(seed)
    labels = [int(i % 3 == 0) for i in range(n)]
    x = torch.randn(n, DIM, generator=g)
    x[:, 0] += torch.tensor([2.0 * y for y in labels])
    groups = ["a" if i % 2 else "b" for i in range(n)]
    texts = [f"query number {i} about topic {i * 7 % 13}" for i in range(n)]
    return x, labels, groups, texts


def kway_run(k: int = 3, per_class: int = 30, spread: float = 0.6, seed: int = 0):
    """K personas (one domain each), half of each domain's queries won by its persona: the winners sit
    around their persona's centre, the losers (class base) around the origin."""
    g = torch.Generator().manual_seed(seed)
    feats, labels, personas, groups = [], [], [], []
    for p in range(k):
        centre = torch.zeros(DIM)
        centre[p] = 4.0
        for i in range(2 * per_class):
            won = i % 2 == 0
            feats.append((centre if won else torch.zeros(DIM)) + spread * torch.randn(DIM, generator=g))
            labels.append(int(won))
            personas.append(p)
            groups.append(f"domain{p}")
    texts = [f"query {i} of its domain {groups[i]}" for i in range(len(labels))]
    return torch.stack(feats), labels, personas, groups, texts


def persona_list(k: int) -> list[dict]:
    return [{"name": f"p{i}", "key": f"k{i}", "domains": [f"domain{i}"]} for i in range(k)]


# ------------------------------------------------------------------------------------- K = 1


def test_a_binary_run_trains_the_same_gate_as_the_code_before_the_kway_gate(tmp_path):
    """K = 1 (no persona list, a one-persona list, or gate.classes = binary) fits the gate the code
    before issue 29's K-way gate fitted on the same rows: same weights, threshold and decisions; its
    gate_config.json keeps every key of before (plus temperature and calibration) and version 1."""
    x, labels, groups, texts = binary_run()
    cfg = GateConfig(temperature="off")
    old = GateBundle.load(FIXTURE)
    old_cfg = json.loads((FIXTURE / GATE_CONFIG).read_text())
    one = [{"name": "p", "key": "k", "domains": ["a", "b"]}]
    for bundle in (
        train_gate(x, labels, cfg, 0, groups=groups, texts=texts),
        train_gate(x, labels, cfg, 0, groups=groups, texts=texts, personas=[0] * len(labels), persona_list=one),
    ):
        assert bundle.gate.personas == 1 and bundle.gate.temperature == 1.0
        new_state, old_state = bundle.gate.state_dict(), old.gate.state_dict()
        assert sorted(new_state) == sorted(old_state)  # the same weights file layout
        for name, t in old_state.items():
            assert torch.allclose(new_state[name], t, atol=1e-6), name
        assert bundle.threshold == pytest.approx(old.threshold, abs=1e-9)
        probe = torch.cat([x, 3 * torch.randn(6, DIM, generator=torch.Generator().manual_seed(5))])
        a, b = bundle.decide(probe), old.decide(probe)
        assert torch.equal(a.routed, b.routed) and torch.equal(a.abstained, b.abstained)
        assert torch.allclose(a.probs, b.probs, atol=1e-6)
        assert torch.equal(a.persona, torch.where(a.routed, 0, -1))
        bundle.save(tmp_path / "new")
        written = json.loads((tmp_path / "new" / GATE_CONFIG).read_text())
        assert written["format_version"] == 1 and "personas" not in written
        assert set(old_cfg) - {"heldout_indices"} <= set(written)
        for key in ("threshold", "hidden_size", "hidden_sizes", "pooling", "n_train", "n_heldout", "positives"):
            assert written[key] == old_cfg[key], key
    # gate.classes = binary on a run with two personas is the binary gate too
    two = [{"name": "p", "key": "k", "domains": ["a"]}, {"name": "q", "key": "l", "domains": ["b"]}]
    records = [{"query": t, "label": y, "domain": d} for t, y, d in zip(texts, labels, groups)]
    binary = train_gate_on_records(x, records, GateConfig(temperature="off", classes="binary"), 0, persona_list=two)
    assert binary.gate.personas == 1
    assert torch.allclose(binary.gate.mlp[-1].weight, old.gate.mlp[-1].weight, atol=1e-6)


def test_an_old_binary_gate_loads_unchanged():
    """A gate_config.json without temperature / personas / calibration (written before) loads as the
    binary gate with temperature 1, and decides as sigmoid(logit) >= threshold."""
    old_cfg = json.loads((FIXTURE / GATE_CONFIG).read_text())
    assert "temperature" not in old_cfg and "personas" not in old_cfg and old_cfg["format_version"] == 1
    b = GateBundle.load(FIXTURE)
    assert b.gate.personas == 1 and b.gate.temperature == 1.0 and b.personas == ["persona"]
    x = torch.randn(7, DIM)
    d = b.decide(x)
    p = torch.sigmoid(b.gate.logits(x))
    assert torch.equal(d.probs, p)
    assert torch.equal(d.routed, (p >= b.threshold) & ~b.gate.outside(x))
    assert torch.allclose(d.class_probs[:, 1], p, atol=1e-6)


def test_the_binary_temperature_keeps_the_routing_at_one_half_and_is_saved(tmp_path):
    x, labels, groups, texts = binary_run(n=80, seed=1)
    b = train_gate(x, labels, GateConfig(), 0, groups=groups, texts=texts)
    cal = b.info["calibration"]
    assert cal["method"] == "temperature" and cal["temperature"] == b.gate.temperature != 1.0
    z = b.gate.logits(x)
    assert torch.equal(b.gate(x) >= 0.5, z >= 0)  # a temperature moves no row across 0.5
    b.save(tmp_path)
    again = GateBundle.load(tmp_path)
    assert again.gate.temperature == pytest.approx(b.gate.temperature)
    assert torch.allclose(again.gate(x), b.gate(x), atol=1e-6)


# ------------------------------------------------------------------------------------- K >= 2


def test_a_three_persona_gate_learns_the_classes_and_picks_the_persona(tmp_path):
    x, labels, personas, groups, texts = kway_run()
    b = train_gate(
        x, labels, GateConfig(), 0, groups=groups, texts=texts, personas=personas, persona_list=persona_list(3)
    )
    assert b.gate.personas == 3 and b.gate.mlp[-1].out_features == 4
    truth = torch.tensor([(p + 1) * y for p, y in zip(personas, labels)])
    d = b.decide(x)
    decided = d.persona + 1
    assert float((decided == truth).float().mean()) >= 0.9
    assert torch.equal(d.routed, d.persona >= 0) and d.class_probs.shape == (len(labels), 4)
    assert torch.allclose(d.class_probs.sum(-1), torch.ones(len(labels)), atol=1e-5)
    conf = b.info["confusion"]
    assert conf["classes"] == ["base", "p0", "p1", "p2"]
    m = conf["matrix"]
    assert sum(map(sum, m)) == b.info["n_heldout"] and sum(m[i][i] for i in range(4)) >= 0.8 * b.info["n_heldout"]
    # saved as version 2 with its personas, and read back to the same decisions
    b.save(tmp_path)
    written = json.loads((tmp_path / GATE_CONFIG).read_text())
    assert written["format_version"] == 2 and [p["name"] for p in written["personas"]] == ["p0", "p1", "p2"]
    assert "min_confidence" in written and "temperature" in written
    again = GateBundle.load(tmp_path)
    assert again.personas == ["p0", "p1", "p2"]
    d2 = again.decide(x)
    assert torch.equal(d2.persona, d.persona) and torch.allclose(d2.probs, d.probs, atol=1e-6)


def test_soft_targets_from_win_shares_reach_the_persona_class():
    """A query whose samples the persona won 3 of 4 times is fitted to 0.25 base / 0.75 persona."""
    x, labels, personas, groups, texts = kway_run(k=2, per_class=20)
    records = [
        {"query": t, "label": y, "domain": g, "samples": [{"label": y}, {"label": y}, {"label": y}, {"label": 1 - y}]}
        for t, y, g in zip(texts, labels, groups)
    ]
    b = train_gate_on_records(
        x, records, GateConfig(classes="personas", temperature="off", patience=0, epochs=600), 0, None, persona_list(2)
    )
    assert b.gate.personas == 2
    won = [i for i, y in enumerate(labels) if y]
    with torch.no_grad():
        p_persona = b.gate.class_probs(x[won])
    own = torch.tensor([personas[i] + 1 for i in won])
    got = p_persona.gather(1, own[:, None]).squeeze(1)
    assert 0.55 < float(got.mean()) < 0.9  # pulled to 0.75, not to 1


def test_min_confidence_sends_unsure_rows_to_the_base_model():
    x, labels, personas, groups, texts = kway_run()
    b = train_gate(
        x,
        labels,
        GateConfig(min_confidence="off"),
        0,
        groups=groups,
        texts=texts,
        personas=personas,
        persona_list=persona_list(3),
    )
    assert b.gate.min_confidence == 0.0
    # halfway between persona 0's and persona 1's centres: the gate wants a persona, unsure which
    mid = torch.zeros(4, DIM)
    mid[:, 0] = mid[:, 1] = 2.0
    loose = decide(b.gate, b.threshold, mid)
    strict = decide(b.gate, b.threshold, mid, min_confidence=0.99)
    assert loose.routed.all() and not loose.abstained.any()
    assert not strict.routed.any() and strict.abstained.all() and (strict.persona == -1).all()
    b.gate.min_confidence = 0.99  # the gate's own floor is the default
    assert not b.decide(mid).routed.any()


def test_auto_min_confidence_and_bad_values():
    from prism_persona.errors import PrismError

    x, labels, personas, groups, texts = kway_run()
    b = train_gate(
        x, labels, GateConfig(), 0, groups=groups, texts=texts, personas=personas, persona_list=persona_list(3)
    )
    assert b.info["min_confidence_method"].startswith("auto")
    assert 0.0 <= b.gate.min_confidence <= 1.0
    for bad in ("high", "1.5", "-0.1"):
        with pytest.raises(PrismError, match="gate.min_confidence must be auto, off or a number"):
            GateConfig(min_confidence=bad).validate()
    GateConfig(min_confidence="0.4").validate()


def test_auto_min_confidence_judges_the_persona_choice_where_a_persona_won():
    """Routed base rows (the threshold's error) do not make the persona choice look wrong: with every
    routed persona row right the floor is 0; counted as wrong they pushed it to 1 (nothing routed, the
    two-persona kit's first K-way run). No routed persona row: no floor."""
    from prism_persona.train.gate import auto_min_confidence

    probs = torch.tensor([[0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.2, 0.7, 0.1], [0.3, 0.6, 0.1], [0.1, 0.2, 0.7]])
    labels = [1, 2, 0, 0, 0]  # two persona rows, right; three routed base rows
    floor, how = auto_min_confidence(probs, labels, 0.5)
    assert floor == 0.0 and "2 routed held-out rows where a persona won" in how
    wrong = [2, 1, 0, 0, 0]  # the persona rows get the other persona: a floor above their confidence
    assert auto_min_confidence(probs, wrong, 0.5)[0] >= 0.8
    assert auto_min_confidence(probs, [0, 0, 0, 0, 0], 0.5)[0] == 0.0


# ------------------------------------------------------------------------------------- calibration


def test_temperature_scaling_lowers_the_ece_of_an_overconfident_model():
    """Logits 6x too sharp for the labels (drawn from the true probabilities): the expected calibration
    error falls after temperature scaling, measured cross-fitted, and T lands near 6."""
    g = torch.Generator().manual_seed(0)
    n, c = 600, 3
    true_logits = torch.randn(n, c, generator=g) * 1.2
    labels = torch.multinomial(torch.softmax(true_logits, -1), 1, generator=g).squeeze(1).tolist()
    sharp = true_logits * 6.0
    t, report, after = calibrate_temperature(sharp, labels, "fit", seed=0)
    assert 4.0 < t < 8.5
    assert report["ece_before"] > 0.15 and report["ece_after"] < 0.5 * report["ece_before"]
    conf, ok = top_label(after, labels)
    assert expected_calibration_error(conf, ok) == pytest.approx(report["ece_after"])
    assert sum(b["n"] for b in report["reliability_after"]) == n
    # an underconfident model is not sharpened (the fit only softens: TEMPERATURE_RANGE)
    assert calibrate_temperature(true_logits / 3.0, labels, "fit")[0] == 1.0
    # off / too few rows: temperature 1 and a note
    t0, rep0, _ = calibrate_temperature(sharp[:4], labels[:4], "fit")
    assert t0 == 1.0 and "too few" in rep0["note"]
    assert calibrate_temperature(sharp, labels, "off")[0] == 1.0


def test_expected_calibration_error_by_hand():
    conf = torch.tensor([0.95, 0.95, 0.55, 0.55])
    ok = torch.tensor([1.0, 0.0, 1.0, 1.0])
    # bin (0.9, 1]: confidence .95, accuracy .5; bin (0.5, 0.6]: .55 vs 1
    assert expected_calibration_error(conf, ok) == pytest.approx(0.5 * 0.45 + 0.5 * 0.45)
    assert expected_calibration_error(torch.zeros(0), torch.zeros(0)) is None


def test_reliability_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    x, labels, groups, texts = binary_run(n=80, seed=1)
    b = train_gate(x, labels, GateConfig(), 0, groups=groups, texts=texts)
    png = plot_reliability(b.info["calibration"], tmp_path / "reliability.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_reliability({}, tmp_path / "none.png") is None


# ------------------------------------------------------------------------------------- personas of a run


def test_run_personas_share_one_text_and_name_files():
    texts = {"a": "You are a poet.", "b": "You are a judge.", "c": "You are a poet.  "}
    out = run_personas(["a", "b", "c"], texts, {"a": "/x/poet.txt", "c": "/x/poet.txt"})
    assert [p["name"] for p in out] == ["poet", "b"]
    assert out[0]["domains"] == ["a", "c"] and out[1]["domains"] == ["b"]
    assert out[0]["key"] != out[1]["key"]
    assert len(run_personas(["a", "c"], texts)) == 1  # one persona: the binary gate


def test_a_broken_personas_block_is_refused(tmp_path):
    x, labels, personas, groups, texts = kway_run(k=2, per_class=10)
    b = train_gate(
        x, labels, GateConfig(), 0, groups=groups, texts=texts, personas=personas, persona_list=persona_list(2)
    )
    b.save(tmp_path)
    cfg = json.loads((tmp_path / GATE_CONFIG).read_text())
    for bad in ({"personas": ["only one"]}, {"temperature": 0}, {"temperature": math.inf}, {"min_confidence": 2}):
        (tmp_path / GATE_CONFIG).write_text(json.dumps({**cfg, **bad}).replace("Infinity", "1e999"))
        with pytest.raises(ValueError):
            GateBundle.load(tmp_path)
    assert (tmp_path / GATE_WEIGHTS).exists()


def test_gate_k_way_forward_is_the_best_persona_against_base():
    torch.manual_seed(0)
    gate = Gate(DIM, [], dropout=0.0, pooling="mean", personas=3)
    with torch.no_grad():
        gate.mlp[-1].weight.normal_()
    gate.temperature = 2.0
    x = torch.randn(5, DIM)
    cp = torch.softmax(gate.logits(x) / 2.0, -1)
    best = cp[:, 1:].max(-1).values
    assert torch.allclose(gate(x), best / (best + cp[:, 0]), atol=1e-6)
    assert torch.allclose(gate.class_probs(x), cp, atol=1e-6)
    assert torch.allclose(decide(gate, 0.5, x).probs, gate(x), atol=1e-6)
    z = torch.randn(6)  # K = 1: the class logits [0, z] give the binary gate's sigmoid, bit for bit
    assert torch.equal(routing_probability(torch.stack([torch.zeros_like(z), z], -1)), torch.sigmoid(z))


def test_kway_routing_counts_only_the_persona_the_row_would_get_and_ignores_the_temperature():
    """A row is routed to its most probable persona only, so it is routed where that persona is more
    probable than base: P(base) 0.4 against 0.35 / 0.25 stays on the base model (1 - P(base) = 0.6
    routed it). A temperature (which only softens) moves no decision at 0.5; with 1 - P(base) it pushed
    every row towards K / (K + 1) and so towards routing (the two-persona kit: T = 20 routed 96 % of
    the base-class held-out queries)."""
    gate = Gate(4, [], dropout=0.0, pooling="mean", personas=2)
    p = torch.tensor([[0.40, 0.35, 0.25], [0.30, 0.45, 0.25], [0.60, 0.30, 0.10], [0.20, 0.10, 0.70]])
    with torch.no_grad():  # row i is the i-th unit vector, whose logits are log p[i] (no standardisation)
        gate.mlp[-1].weight.copy_(p.log().T)
        gate.mlp[-1].bias.zero_()
    x = torch.eye(4)
    assert torch.allclose(gate.class_probs(x), p, atol=1e-6)
    d = decide(gate, 0.5, x)
    assert d.routed.tolist() == [False, True, False, True]
    assert d.persona.tolist() == [-1, 0, -1, 1]
    assert torch.allclose(d.probs, torch.tensor([0.35 / 0.75, 0.45 / 0.75, 0.30 / 0.90, 0.70 / 0.90]), atol=1e-5)
    for t in (1.5, 4.0, 20.0):
        gate.temperature = t
        assert decide(gate, 0.5, x).routed.tolist() == [False, True, False, True]
        # 1 - P(base) at this temperature would route every row
        assert bool(((1 - gate.class_probs(x)[:, 0]) >= 0.5).all()) == (t >= 4.0)


# ------------------------------------------------------------------------------------- the gate stage


def _stage_run(tmp_path, texts: dict):
    from prism_persona import config as C
    from prism_persona.store import RunDir

    cfg = C.resolve(
        "tiny",
        overrides={"out": str(tmp_path / "run"), "persona": {"domains": ["w", "c"]}, "gate": {"classes": "personas"}},
    )
    run = RunDir(cfg.out)
    run.root.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"key": f"{d}-{cfg.persona.use_length}", "domain": d, "length": cfg.persona.use_length, "text": t})
        for d, t in texts.items()
    ]
    run.path("personas.jsonl").write_text("\n".join(lines) + "\n")
    recs = [
        {
            "key": f"k{i}",
            "domain": "w" if i % 2 else "c",
            "query": f"question number {i} about {'poems' if i % 2 else 'code'}",
            "label": int(i % 4 < 2),
        }
        for i in range(24)
    ]
    return cfg, run, recs


def test_the_gate_stage_trains_a_two_persona_gate_with_its_report(tiny_model, tmp_path):
    """Two domains with two persona texts: the stage writes a K = 2 gate (version 2, its personas), the
    calibration with ECE before/after, the reliability plot, and the training report shows them."""
    from prism_persona.train.gate import run_gate
    from prism_persona.train.report import build_report, format_report

    model, tok = tiny_model
    cfg, run, recs = _stage_run(tmp_path, {"w": "You are a poet.", "c": "You are a coder."})
    info = run_gate(run, cfg, recs, model, tok)
    assert info["personas"] == ["w", "c"] and info["confusion"]["classes"] == ["base", "w", "c"]
    assert set(info["calibration"]) >= {"temperature", "ece_before", "ece_after"}
    assert Path(info["reliability_plot"]).read_bytes()[:4] == b"\x89PNG"
    bundle = GateBundle.load(run.path("gate"))
    assert bundle.gate.personas == 2 and bundle.info["format_version"] == 2 and bundle.personas == ["w", "c"]
    assert bundle.info["personas"][0]["domains"] == ["w"]
    md = format_report(build_report(run, recs))
    assert "expected calibration error" in md and "![reliability](gate/reliability.png)" in md
    assert "Held-out confusion" in md and "| won \\ decided | base | w | c |" in md


def test_the_gate_stage_of_one_shared_persona_is_the_binary_gate(tiny_model, tmp_path):
    from prism_persona.train.gate import run_gate

    model, tok = tiny_model
    cfg, run, recs = _stage_run(tmp_path, {"w": "You are a poet.", "c": "You are a poet."})
    info = run_gate(run, cfg, recs, model, tok)
    assert "personas" not in info and "calibration" in info
    bundle = GateBundle.load(run.path("gate"))
    assert bundle.gate.personas == 1 and json.loads((run.path("gate") / GATE_CONFIG).read_text())["format_version"] == 1


# ------------------------------------------------------------------------------------- routing paths


def test_every_routing_path_agrees_on_a_three_persona_gate(tiny_model_dir, tmp_path):
    """A K = 3 gate in an artifact: route(), the prefill hook (with the persona per row), the vLLM router
    and lm-eval give the same probabilities and routes; the prefill's persona is decide()'s."""
    from prism_persona.engines.base import SamplingParams
    from prism_persona.evals.lmeval import PrismLM
    from prism_persona.gated.features import query_features
    from prism_persona.gated.model import GatedModel
    from prism_persona.gated.router import load_router
    from prism_persona.models import load_model, render_chat, user_chat
    from prism_persona.testing import SPLIT_QUERIES, make_tiny_artifact

    art = make_tiny_artifact(tiny_model_dir, tmp_path / "prism", cache=False)
    queries = list(SPLIT_QUERIES) + ["a much longer request about the history of the printing press", "hi"]
    base, tok = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    feats = query_features(base, tok, queries, 16, GateConfig().pooling)
    torch.manual_seed(3)
    gate = Gate(feats.shape[1], [], dropout=0.0, pooling=GateConfig().pooling, personas=3)
    gate.set_standardisation(feats)
    with torch.no_grad():
        gate.mlp[-1].weight.normal_(0, 1.0)
    gate.eval()
    gate.min_confidence = 0.45
    GateBundle(gate=gate, threshold=0.5, info={"personas": persona_list(3)}).save(art)
    want = decide(gate, 0.5, feats)
    assert want.routed.any() and (~want.routed).any()  # both routes exercised

    chats = [user_chat(q) for q in queries]
    gm = GatedModel.from_pretrained(art, device="cpu", dtype="float32")
    assert gm.gate.personas == 3
    decided = gm.decisions(chats)
    completions = gm.generate(chats, SamplingParams(max_new_tokens=1))
    router = load_router(str(art), device="cpu", dtype="float32").route(chats)
    lm = PrismLM(artifact=str(art), system="prism", device="cpu", dtype="float32", batch_size=2)
    via_lmeval, routed_lmeval = lm.route([lm.tok_encode(render_chat(lm.tokenizer, c)) for c in chats])
    for name, probs in [
        ("route", [d["gate_prob"] for d in decided]),
        ("prefill", [c.meta["gate_prob"] for c in completions]),
        ("router", [p for p, _ in router]),
        ("lmeval", via_lmeval),
    ]:
        assert probs == pytest.approx(want.probs.tolist(), abs=1e-4), name
    for name, routed in [
        ("route", [d["routed"] for d in decided]),
        ("prefill", [c.meta["routed"] for c in completions]),
        ("router", [r for _, r in router]),
        ("lmeval", [bool(r) for r in routed_lmeval]),  # a K-way gate: the persona's name, or none
    ]:
        assert routed == want.routed.tolist(), name
    # the prefill's persona per row (its rows in the order of its last batch) is decide()'s on its features
    assert gm.persona is not None and gm.state.features is not None
    assert torch.equal(gm.persona, decide(gm.gate, gm.threshold, gm.state.features).persona)
    assert torch.equal(gm.persona >= 0, gm.state.routed)
    if gm.persona.numel() == len(queries):  # one batch: the same personas, in its order
        assert sorted(gm.persona.tolist()) == sorted(want.persona.tolist())
    assert [d["persona"] for d in decided] == want.persona.tolist()

    # prism check's per-persona confusion: expected class (the domain's persona where routed) vs decide()'s
    from prism_persona.train.check import HeldoutQuery, persona_confusion

    domains = [f"domain{i % 3}" for i in range(len(queries))]
    routes = [i % 2 == 0 for i in range(len(queries))]
    items = [HeldoutQuery(f"k{i}", d, q, r) for i, (d, q, r) in enumerate(zip(domains, queries, routes))]
    items.append(HeldoutQuery("x", "elsewhere", "a query of a domain no persona lists", True))
    pc = persona_confusion(gm, items)
    matrix = [[0] * 4 for _ in range(4)]
    for i, k in enumerate(want.persona.tolist()):
        matrix[(i % 3) + 1 if routes[i] else 0][k + 1] += 1
    assert pc["classes"] == ["base", "p0", "p1", "p2"] and pc["matrix"] == matrix and pc["left_out"] == 1


# ------------------------------------------------------------------------------------- prism run end to end


def test_prism_run_with_two_personas_assembles_a_kway_artifact_that_generates(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """`prism run` (bootstrap faked) on two domains with two persona texts: the artifact's gate is K = 2,
    the training report carries its calibration and confusion, and the gated model routes and answers."""
    import prism_persona.train.pipeline as P
    from prism_persona import cli
    from prism_persona import config as C
    from prism_persona.engines.base import SamplingParams
    from prism_persona.gated.model import GatedModel
    from prism_persona.models import user_chat
    from prism_persona.store import RunDir

    domains = ["writing", "coding"]
    records = [
        {
            "key": f"k{i}",
            "domain": domains[i % 2],
            "query": f"Please help me with {domains[i % 2]} task number {i}.",
            "persona": f"You are a world-class expert in {domains[i % 2]}.",
            "placement": "system",
            "base_answer": "Sure.",
            "persona_answer": f"As an expert in {domains[i % 2]}: step {i}, done.",
            "label": int(i % 4 in (0, 1)),
        }
        for i in range(24)
    ]

    def run_bootstrap(cfg, engine=None, judge=None):
        run = RunDir(cfg.out)
        run.write_json("config.json", json.loads(C.dump(cfg)))
        rows = [
            {"key": f"{d}-{n}", "domain": d, "length": n, "text": f"You are a world-class expert in {d}."}
            for d in domains
            for n in cfg.persona.lengths
        ]
        run.path("personas.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if not run.done("bootstrap"):
            run.write_json("summary.json", {"wall_seconds": 1.0})
            run.mark_done("bootstrap", {})
        return {}

    monkeypatch.setattr(P, "run_bootstrap", run_bootstrap)
    monkeypatch.setattr(P, "load_labelled", lambda run, *a, **k: records)
    out = tmp_path / "run"
    args = ["run", "--model", str(tiny_model_dir), "--domains", ",".join(domains), "--out", str(out)]
    args += [
        "--preset",
        "tiny",
        "--set",
        "gate.epochs=30",
        "--set",
        "gate.classes=personas",
        "--set",
        "distill.epochs=1",
        "--set",
        "distill.r=4",
        "-q",
    ]
    assert cli.main(args) == 0
    art = out / "prism"
    bundle = GateBundle.load(art)
    assert bundle.gate.personas == 2 and bundle.personas == domains
    rep = json.loads((out / "training_report.json").read_text())
    assert rep["gate"]["personas"] == domains and rep["gate"]["calibration"]["ece_before"] is not None
    assert (out / "gate" / "reliability.png").is_file()
    gm = GatedModel.from_pretrained(art, device="cpu", dtype="float32")
    chats = [user_chat(r["query"]) for r in records[:6]]
    done = gm.generate(chats, SamplingParams(max_new_tokens=2))
    assert len(done) == 6 and all("gate_prob" in c.meta for c in done)
    assert [d["routed"] for d in gm.decisions(chats)] == [c.meta["routed"] for c in done]

    # gate.classes changed on the finished run: --redo gate alone would pair a binary gate with the two
    # persona adapters; refused in one line, the run as it was
    before = {p.name: p.read_bytes() for p in art.iterdir() if p.is_file()}
    capsys.readouterr()
    cli.setup_logging(quiet=True)
    rc = cli.main([*args[:-1], "--set", "gate.classes=binary", "--redo", "gate", "-q"])
    line = one_error_line(capsys)
    assert rc == 2 and "2 personas (writing, coding)" in line and "--redo verdicts" in line, line
    assert {p.name: p.read_bytes() for p in art.iterdir() if p.is_file()} == before
    assert GateBundle.load(art).gate.personas == 2
