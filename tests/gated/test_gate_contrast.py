"""The abstain rule relative to an everyday reference (issue 29, ``gate.ood_contrast``): a query more
typical of everyday requests, relative to the persona's wins, than the wins themselves goes to the base
model; the everyday region travels with the gate; gates without it decide as before."""

from __future__ import annotations

import json

import torch

from prism_persona.config import GateConfig, RunConfig
from prism_persona.gated.gate import Gate, GateBundle, decide
from prism_persona.train.gate import fit_contrast, fit_ood, gate_settings, train_gate

DIM = 8


def blob(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, DIM, generator=g) + shift


def always_route_gate(x: torch.Tensor) -> Gate:
    gate = Gate(DIM, [], dropout=0.0, pooling="mean")
    gate.set_standardisation(x)
    with torch.no_grad():
        gate.mlp[-1].weight.zero_()
        gate.mlp[-1].bias.fill_(3.0)  # p = 0.95 everywhere: only the abstain rule can say no
    return gate


def test_a_query_near_the_everyday_set_abstains_and_one_near_the_wins_routes():
    wins, everyday = blob(40, 0), blob(80, 1, shift=2.5)
    gate = always_route_gate(torch.cat([wins, everyday]))
    # a wide wins' region (as a run's few wins give): the everyday queries lie inside it
    gate.ood, _ = fit_ood(gate, wins, "mahalanobis", 1.0, 5, scale=3.0)
    near_everyday, near_wins = blob(50, 2, shift=2.5), blob(50, 3)
    assert decide(gate, 0.5, near_everyday).routed.float().mean() >= 0.8  # the wins' region alone routes them
    before = decide(gate, 0.5, near_wins).routed
    gate.ood_contrast, info = fit_contrast(gate, wins, everyday, "mahalanobis", 1.0, 5)
    assert info["method"] == "mahalanobis" and info["everyday_rows"] == 80 and info["threshold"] > 0
    d_every, d_wins = decide(gate, 0.5, near_everyday), decide(gate, 0.5, near_wins)
    assert d_every.abstained.float().mean() >= 0.9 and d_every.routed.float().mean() <= 0.1
    assert d_wins.routed.float().mean() >= 0.9
    assert not (d_wins.routed & ~before).any()  # the rule only ever adds abstentions
    # the limit is the wins' own largest ratio (quantile 1): the training wins themselves stay routed
    assert decide(gate, 0.5, wins).routed.float().mean() >= 0.9
    # no wins' region (gate.ood = off): no contrast either
    gate.ood = None
    assert fit_contrast(gate, wins, everyday, "mahalanobis", 1.0, 5)[0] is None


def test_train_gate_fits_the_everyday_region_only_when_asked_and_never_in_the_probability():
    x = torch.cat([blob(40, 4), blob(40, 5, shift=2.0)])
    labels = [0] * 40 + [1] * 40
    everyday = blob(60, 6, shift=-2.0)
    plain = train_gate(x, labels, GateConfig(epochs=40, ood_contrast="off"), everyday=everyday)
    on = train_gate(x, labels, GateConfig(epochs=40, ood_contrast="builtin"), everyday=everyday)
    assert plain.gate.ood_contrast is None and "contrast" not in plain.info["ood_fit"]
    assert on.gate.ood_contrast is not None and on.info["ood_fit"]["contrast"]["method"] == "mahalanobis"
    probe = torch.cat([x, everyday])
    torch.testing.assert_close(on.gate(probe), plain.gate(probe))  # same probability, same threshold
    assert on.threshold == plain.threshold
    assert decide(on.gate, on.threshold, everyday).routed.float().mean() <= 0.1
    # asked for but no wins' region, or no everyday rows given: the rule is today's
    off = train_gate(x, labels, GateConfig(epochs=40, ood="off", ood_contrast="builtin"), everyday=everyday)
    assert off.gate.ood is None and off.gate.ood_contrast is None
    assert train_gate(x, labels, GateConfig(epochs=40, ood_contrast="builtin")).gate.ood_contrast is None


def test_the_everyday_region_saves_and_loads_with_the_gate(tmp_path):
    x = torch.cat([blob(30, 7), blob(30, 8, shift=2.0)])
    everyday = blob(50, 9, shift=-2.0)
    b = train_gate(x, [0] * 30 + [1] * 30, GateConfig(epochs=30, ood_contrast="builtin"), everyday=everyday)
    b.save(tmp_path)
    cfg = json.loads((tmp_path / "gate_config.json").read_text())
    assert cfg["ood"]["contrast"]["threshold"] == b.gate.ood_contrast.limit
    loaded = GateBundle.load(tmp_path)
    assert loaded.gate.ood_contrast is not None
    probe = torch.cat([x, everyday, blob(5, 10, shift=9.0)])
    for got, want in zip(loaded.decide(probe), b.decide(probe)):
        assert torch.equal(got, want)
    torch.testing.assert_close(loaded.gate.ood_contrast.score(probe), b.gate.ood_contrast.score(probe))


def test_a_gate_without_the_field_decides_by_the_wins_region_alone(tmp_path):
    x = torch.cat([blob(30, 11), blob(30, 12, shift=2.0)])
    b = train_gate(x, [0] * 30 + [1] * 30, GateConfig(epochs=30, ood_contrast="off"), everyday=blob(20, 15))
    b.save(tmp_path)
    cfg = json.loads((tmp_path / "gate_config.json").read_text())
    assert "contrast" not in cfg["ood"]
    loaded = GateBundle.load(tmp_path)
    assert loaded.gate.ood_contrast is None
    probe = torch.cat([x, blob(20, 13, shift=-2.0), blob(5, 14, shift=9.0)])
    outside = loaded.gate.ood.score(loaded.gate.standardise(probe)) > loaded.gate.ood.limit
    assert torch.equal(loaded.gate.outside(probe), outside)


def test_the_setting_is_absent_from_the_stage_settings_at_its_default_so_old_runs_resume():
    assert RunConfig().gate.ood_contrast == "builtin"
    assert "ood_contrast" not in gate_settings(RunConfig())["gate"]
    cfg = RunConfig()
    cfg.gate.ood_contrast = "off"
    assert gate_settings(cfg)["gate"]["ood_contrast"] == "off"
