"""Base examples for the gate (issue 29, gate.base_queries): queries that should stay on the base model
are added to the gate's training as label 0; the built-in list ships with the package."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prism_persona import config as C
from prism_persona.errors import PrismError
from prism_persona.how_to_run import check_how_to_run
from prism_persona.text import jaccard, word_set
from prism_persona.train.gate import (
    base_queries,
    builtin_base_queries,
    new_base_queries,
    read_base_queries,
    run_gate,
    train_gate,
    with_base_rows,
)

ROOT = Path(__file__).resolve().parents[2]


def test_builtin_list_ships_and_holds_none_of_the_measurement_sets():
    qs = builtin_base_queries()
    assert 100 <= len(qs) <= 200 and len(set(qs)) == len(qs) and all(q == q.strip() and q for q in qs)
    assert base_queries("builtin") == qs and base_queries("off") == []
    # the sets the default was measured on (scripts/ood_study.py) must not be in it, nor near-copies
    measured = []
    for kit in ("safety", "style"):
        for name in ("train_queries.jsonl", "heldout.jsonl"):
            path = ROOT / "src" / "prism_persona" / "kits" / kit / name
            measured += [json.loads(line)["query"] for line in path.read_text().splitlines() if line.strip()]
    shared = [ROOT.parent / "shared" / "benchmarks"]  # the full set, where present (a checkout beside shared/)
    mtbench = [*(ROOT / "tests" / "fixtures").glob("mtbench*.jsonl"), *(d / "mt_bench_questions.jsonl" for d in shared)]
    for path in (p for p in mtbench if p.is_file()):
        measured += [json.loads(line)["turns"][0] for line in path.read_text().splitlines() if line.strip()]
    for path in (ROOT / "tests" / "fixtures").glob("mmlu*.jsonl"):
        measured += [json.loads(line)["question"] for line in path.read_text().splitlines() if line.strip()]
    assert len(measured) > 400
    words = [word_set(q) for q in measured]
    worst = max((jaccard(word_set(b), w), b) for b in qs for w in words)
    assert worst[0] < 0.6, worst
    # package data: pyproject ships it
    assert '"data/*.txt"' in (ROOT / "pyproject.toml").read_text()


def test_a_user_file_txt_and_jsonl_and_its_one_line_errors(tmp_path):
    txt = tmp_path / "base.txt"
    txt.write_text("# comment\nWhat is 2 + 2?\n\n  Name a river.  \n", encoding="utf-8")
    assert read_base_queries(str(txt)) == ["What is 2 + 2?", "Name a river."]
    jl = tmp_path / "base.jsonl"
    jl.write_text('{"query": "Who wrote Hamlet?"}\n"How far is Paris?"\n{"prompt": "Hi"}\n', encoding="utf-8")
    assert base_queries(str(jl)) == ["Who wrote Hamlet?", "How far is Paris?", "Hi"]
    bad = {
        "missing.txt": None,
        "empty.txt": "# only a comment\n\n",
        "long.txt": "ok\n" + "x" * (C.MAX_TEXT_CHARS + 1) + "\n",
        "broken.jsonl": '{"query": "a"}\n{not json\n',
        "noquery.jsonl": '{"domain": "x"}\n',
    }
    for name, text in bad.items():
        p = tmp_path / name
        if text is not None:
            p.write_text(text, encoding="utf-8")
        with pytest.raises(PrismError) as e:
            read_base_queries(str(p))
        assert "\n" not in str(e.value) and name in str(e.value)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9?\n".encode("latin-1"))
    with pytest.raises(PrismError, match="not UTF-8"):
        read_base_queries(str(tmp_path / "latin1.txt"))


def test_base_rows_weigh_one_cell_and_run_queries_keep_their_label():
    x, w = torch.randn(6, 4), torch.tensor([1.0, 1.0, 2.0, 2.0, 0.5, 0.5])
    xb = torch.randn(10, 4)
    x2, t2, w2 = with_base_rows(x, [1, 0, 1, 0, 1, 0], w, xb, cells=3)
    assert x2.shape == (16, 4) and t2[6:] == [0.0] * 10 and torch.equal(w2[:6], w)
    assert float(w2[6:].sum()) == pytest.approx(float(w.sum()) / 3) and torch.equal(x2[6:], xb)
    assert with_base_rows(x, [1] * 6, w, None, 3)[0] is x
    assert new_base_queries(["What is 2+2?", "what  is 2+2?", "Name a river", "Q"], ["name a river"]) == [
        "What is 2+2?",
        "Q",
    ]


def _separable(n: int, seed: int):
    """Run rows: label = feature 0 > 0. Feature 1 is ~0 for all of them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g) * 0.3
    t = torch.linspace(-2, 2, n)
    x[:, 0] = t + 0.5 * t.sign()  # a margin around 0
    return x, [int(v > 0) for v in x[:, 0]]


def test_base_examples_keep_foreign_queries_off_and_stay_out_of_heldout_and_region():
    cfg = C.GateConfig(ood="off", patience=0, epochs=400, lr=5e-2, weight_decay=0.0)
    x, y = _separable(40, 0)
    # "foreign" queries: off the run's feature 1 axis and on the routed side of feature 0
    g = torch.Generator().manual_seed(1)
    foreign = torch.randn(30, 8, generator=g) * 0.3
    foreign[:, 0] = 1.0
    foreign[:, 1] = 4.0
    base = torch.randn(60, 8, generator=g) * 0.3
    base[:, 0] = torch.rand(60, generator=g) * 3 - 1
    base[:, 1] = 4.0 + torch.randn(60, generator=g) * 0.3
    plain = train_gate(x, y, cfg, seed=0)
    with_base = train_gate(x, y, cfg, seed=0, base_features=base)
    routed = lambda b, f: float(b.route(f)[1].float().mean())  # noqa: E731
    assert routed(plain, foreign) > 0.9 and routed(with_base, foreign) < 0.2
    assert with_base.info["base_examples"] == 60 and plain.info["base_examples"] == 0
    # the held-out split, its metrics and the standardisation are the run's own rows only
    assert with_base.info["n_heldout"] == plain.info["n_heldout"] and with_base.info["n_train"] == plain.info["n_train"]
    assert plain.info["metrics"]["heldout"]["balanced_accuracy"] == 1
    assert with_base.info["metrics"]["heldout"]["balanced_accuracy"] >= 0.9
    torch.testing.assert_close(with_base.gate.mean, plain.gate.mean)
    # the abstain region is fitted on the run's queries, not the base examples
    on = C.GateConfig(ood="knn", ood_reference="all")  # knn stores its reference rows
    region = train_gate(x, y, on, seed=0, base_features=base).info["ood_fit"]
    assert region["rows"] == 40


def test_run_gate_adds_the_builtin_base_examples_and_off_leaves_them_out(tiny_model, tmp_path):
    from prism_persona.store import RunDir

    model, tok = tiny_model
    recs = [
        {"key": f"k{i}", "domain": "w" if i % 2 else "c", "query": f"question {i} about {'poems' if i % 2 else 'code'}"}
        | {"label": i % 2}
        for i in range(16)
    ]
    n = len(builtin_base_queries())
    for spec, expected in (("builtin", n), ("off", 0)):
        cfg = C.resolve(
            "tiny",
            overrides={"out": str(tmp_path / spec), "persona": {"domains": ["w", "c"]}, "gate": {"base_queries": spec}},
        )
        info = run_gate(RunDir(cfg.out), cfg, recs, model, tok)
        assert info["base_examples"] == expected and info["n_heldout"] == 4


@pytest.mark.parametrize("setting", C.QUERIES_FILE_SETTINGS)
def test_a_saved_config_never_reads_a_queries_file_outside_the_run(tmp_path, setting):
    """gate.base_queries and gate.ood_contrast name a user's file the same way."""
    outside = tmp_path / "mine.txt"
    outside.write_text("What is 2 + 2?\n", encoding="utf-8")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    saved = {"gate": {setting: str(outside)}}
    cfg = C.resolve("tiny", overrides=saved)
    with pytest.raises(PrismError, match=rf"gate.{setting} = .*--set gate.{setting}="):
        check_how_to_run(cfg, saved, {}, "runs/x/config.json", str(run_dir))
    check_how_to_run(cfg, saved, saved, "runs/x/config.json", str(run_dir))  # typed again: used
    inside = run_dir / "base.txt"
    inside.write_text("What is 2 + 2?\n", encoding="utf-8")
    check_how_to_run(cfg, {"gate": {setting: str(inside)}}, {}, "c", str(run_dir))
    for word in ("off", "builtin"):  # no file: nothing to refuse
        check_how_to_run(cfg, {"gate": {setting: word}}, {}, "c", str(run_dir))
    # a relative path in a config file is relative to that file
    (tmp_path / "cfg.json").write_text(json.dumps({"gate": {setting: "mine.txt"}}))
    assert getattr(C.resolve("tiny", file=tmp_path / "cfg.json").gate, setting) == str(outside.resolve())


def test_prism_run_refuses_a_bad_base_queries_file_before_anything_loads(tmp_path, monkeypatch, capsys):
    import prism_persona.train.pipeline as P
    from prism_persona import cli

    monkeypatch.setattr(P, "load_base", lambda cfg: pytest.fail("model loaded"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("\n", encoding="utf-8")
    args = ["run", "--out", str(tmp_path / "run"), "--domains", "w,c", "-q", "--set"]
    assert cli.main(args + ["gate.base_queries=missing.txt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"not found: {tmp_path / 'missing.txt'}" in err  # resolved where typed
    assert cli.main(args + ["gate.base_queries=empty.txt"]) == 2
    assert "holds no queries" in capsys.readouterr().err


def test_the_gate_stage_depends_on_the_base_queries_content(tmp_path):
    from prism_persona.train.gate import gate_settings

    f = tmp_path / "base.txt"
    f.write_text("What is 2 + 2?\n", encoding="utf-8")
    cfg = C.resolve("tiny", overrides={"gate": {"base_queries": str(f)}})
    before = gate_settings(cfg)
    f.write_text("What is 2 + 3?\n", encoding="utf-8")
    assert gate_settings(cfg) != before  # an edited file is a changed setting: the stage is not reused
    builtin = gate_settings(C.resolve("tiny", overrides={"gate": {"base_queries": "builtin"}}))
    assert builtin["base_queries_hash"] and "base_queries_hash" not in gate_settings(C.resolve("tiny"))  # off: default
