"""The abstain rule relative to an everyday reference (issue 29, ``gate.ood_contrast``): a query more
typical of everyday requests, relative to the persona's wins, than the wins themselves goes to the base
model; the everyday region travels with the gate; gates without it decide as before."""

from __future__ import annotations

import json

import pytest
import torch

from prism_persona.config import MAX_TEXT_CHARS, GateConfig, RunConfig
from prism_persona.gated.gate import Gate, GateBundle, decide
from prism_persona.train.gate import builtin_base_queries, fit_contrast, fit_ood, gate_settings, train_gate

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


# --------------------------------------------------------------------------------------------------
# gate.ood_contrast = PATH: the user's own everyday queries (the formats, limits and checks of base_queries)


def scripted_features(shifts: dict):
    """A stand-in for ``query_features``: each query's feature is a fixed random point (seeded by its
    text) around the shift of the first word of ``shifts`` it starts with (else ``shifts['']``)."""
    import zlib

    def features(model, tokenizer, queries, batch_size, pooling):
        rows = []
        for q in queries:
            shift = next((v for k, v in shifts.items() if k and q.startswith(k)), shifts[""])
            g = torch.Generator().manual_seed(zlib.crc32(q.encode()))
            rows.append(torch.randn(DIM, generator=g) + shift)
        return torch.stack(rows) if rows else torch.zeros(0, DIM)

    return features


SHIFTS = {"win": 0.0, "lose": -2.0, "everyday": 2.5, "": -6.0}  # '': the built-in list, far from all


def records() -> list[dict]:
    return [
        {"key": f"k{i}", "domain": "w" if i % 2 else "c", "query": f"{'win' if i % 2 else 'lose'} q{i}", "label": i % 2}
        for i in range(80)
    ]


def everyday_run(tmp_path, monkeypatch, tiny_model, spec: str, name: str):
    import prism_persona.train.gate as G
    from prism_persona import config as C
    from prism_persona.store import RunDir

    monkeypatch.setattr(G, "query_features", scripted_features(SHIFTS))
    over = {"out": str(tmp_path / name), "persona": {"domains": ["w", "c"]}, "gate": {"ood_contrast": spec}}
    cfg = C.resolve("tiny", overrides=over | {"gate": over["gate"] | {"ood_scale": 20.0, "epochs": 30}})
    info = G.run_gate(RunDir(cfg.out), cfg, records(), *tiny_model)
    return info, GateBundle.load(tmp_path / name / "gate")


def test_a_file_of_everyday_queries_builds_the_everyday_region(tmp_path, monkeypatch, tiny_model):
    mine = tmp_path / "everyday.jsonl"
    mine.write_text("".join(json.dumps({"query": f"everyday e{i}"}) + "\n" for i in range(40)), encoding="utf-8")
    near_file = scripted_features(SHIFTS)(None, None, [f"everyday probe {i}" for i in range(40)], 8, "mean")
    near_wins = scripted_features(SHIFTS)(None, None, [f"win probe {i}" for i in range(40)], 8, "mean")
    rates, rows = {}, {}
    for spec in ("off", "builtin", str(mine)):
        info, bundle = everyday_run(tmp_path, monkeypatch, tiny_model, spec, f"run-{len(rates)}")
        rates[spec] = [float(bundle.gate.outside(x).float().mean()) for x in (near_file, near_wins)]
        rows[spec] = info["ood"].get("contrast", {}).get("everyday_rows")
    assert rows == {"off": None, "builtin": len(builtin_base_queries()), str(mine): 40}  # the file's, not the list
    # a wide wins' region (ood_scale 20) keeps the probes inside; the file's region moves those near it out
    assert rates["off"] == [0.0, 0.0], rates
    assert rates[str(mine)][0] >= 0.9 and rates[str(mine)][1] <= 0.1, rates
    # the artifact's gate holds the fitted tensors only: neither the file's path nor its queries
    for f in (tmp_path / "run-2" / "gate").iterdir():
        data = f.read_bytes()
        assert str(mine).encode() not in data and b"everyday e1" not in data and b"everyday.jsonl" not in data, f


def test_too_few_everyday_queries_fall_back_to_the_wins_region_with_a_warning(
    tmp_path, monkeypatch, tiny_model, caplog
):
    mine = tmp_path / "few.txt"
    mine.write_text("# my users' everyday requests\neveryday a\neveryday b\nwin q1\n", encoding="utf-8")
    with caplog.at_level("WARNING", logger="prism_persona"):
        info, bundle = everyday_run(tmp_path, monkeypatch, tiny_model, str(mine), "few")
    assert bundle.gate.ood is not None and bundle.gate.ood_contrast is None
    # 'win q1' is a run query: it keeps its label and is not an everyday row
    assert info["ood"]["contrast"] == {
        "method": "off",
        "note": "too few rows (2 everyday, 40 reference) for the everyday region",
    }
    assert "too few for the everyday region" in caplog.text


def test_the_stage_depends_on_the_everyday_file_content_and_not_at_the_default(tmp_path):
    from prism_persona import config as C

    f = tmp_path / "everyday.txt"
    f.write_text("What is 2 + 2?\n", encoding="utf-8")
    cfg = C.resolve("tiny", overrides={"gate": {"ood_contrast": str(f)}})
    before = gate_settings(cfg)
    assert before["gate"]["ood_contrast"] == str(f) and before["ood_contrast_hash"]
    f.write_text("What is 2 + 3?\n", encoding="utf-8")
    assert gate_settings(cfg) != before  # an edited file is a changed setting: the stage is not reused
    for spec in ("builtin", "off"):  # no file, no hash; builtin (the default) leaves the key out
        settings = gate_settings(C.resolve("tiny", overrides={"gate": {"ood_contrast": spec}}))
        assert "ood_contrast_hash" not in settings and ("ood_contrast" in settings["gate"]) == (spec == "off")


def test_bad_everyday_files_are_one_line_errors_before_anything_loads(tmp_path, monkeypatch, capsys):
    import prism_persona.train.pipeline as P
    from prism_persona import cli

    monkeypatch.setattr(P, "load_base", lambda cfg: pytest.fail("model loaded"))
    monkeypatch.chdir(tmp_path)
    files = {
        "empty.txt": (b"# nothing\n\n", "holds no queries"),
        "latin1.txt": ("caf\xe9?\n".encode("latin-1"), "not UTF-8"),
        "broken.jsonl": (b'{"query": "a"}\n{not json\n', "line 2 is not valid JSON"),
        "noquery.jsonl": (b'{"domain": "x"}\n', "expected a non-empty query"),
        "long.txt": (b"ok\n" + b"x" * (MAX_TEXT_CHARS + 1), "characters; at most"),
    }
    for name, (data, _) in files.items():
        (tmp_path / name).write_bytes(data)
    args = ["run", "--out", str(tmp_path / "run"), "--domains", "w,c", "-q", "--set"]
    assert cli.main(args + ["gate.ood_contrast=missing.txt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"(gate.ood_contrast) not found: {tmp_path / 'missing.txt'}" in err, err
    for name, (_, said) in files.items():
        assert cli.main(args + [f"gate.ood_contrast={name}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and said in err and name in err, err


def test_prism_config_shows_the_option_and_its_file(capsys):
    from prism_persona import cli

    assert cli.main(["config"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("gate.ood_contrast "))
    assert "builtin" in line and ".jsonl file" in line and "Fewer than 4 everyday queries" in line
