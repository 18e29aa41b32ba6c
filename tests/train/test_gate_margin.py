"""Labels from the judge's margin: the soft ``margin`` target, the abstain band in ``load_labelled``
and in the gate stage (scripted engines, a tiny model)."""

import math

from prism_persona.bootstrap.verify import load_labelled
from prism_persona.judges import ModelJudge
from prism_persona.store import RunDir
from prism_persona.testing import BootstrapEngine, ScriptedEngine, bootstrap_config
from prism_persona.train.gate import gate_records, gate_targets, run_gate
from prism_persona.train.pipeline import run_bootstrap


def test_margin_target_is_the_sigmoid_of_the_margin_and_a_missing_margin_keeps_the_label():
    recs = [
        {"label": 1, "winner": "persona", "margin": 2.0},
        {"label": 0, "winner": "mixed", "margin": 0.0},
        {"label": 0, "winner": "base", "margin": -1.0},
        {"label": 1, "winner": "persona", "margin": None},  # a rule judge: no margin
    ]
    got = gate_targets(recs, "margin")
    assert [round(t, 3) for t in got] == [round(1 / (1 + math.exp(-2)), 3), 0.5, round(1 / (1 + math.e), 3), 1.0]
    assert gate_targets(recs, "win") == [1.0, 0.0, 0.0, 1.0]


def judged_run(tmp_path, abstain=0.0):
    """A bootstrap whose log-prob judge prefers the persona answer by a margin that depends on the query:
    about every third pair by 0.2 nats only, the others by 3."""

    def scorer(chat, choices):
        text = chat[-1]["content"]
        a = text.split("[Response A]")[1].split("[Response B]")[0]
        query = text.split("[Query]")[1].split("[Response A]")[0].strip()
        gap = 0.2 if sum(map(ord, query)) % 3 == 0 else 3.0
        return {"A": -1.0, "B": -1.0 - gap} if "EXPERT" in a else {"A": -1.0 - gap, "B": -1.0}

    cfg = bootstrap_config(
        tmp_path / "run",
        queries={"queries_per_persona": 6},
        model={"batch_size": 4},
        judge={"abstain_margin": abstain},
    )
    run_bootstrap(cfg, engine=BootstrapEngine(), judge=ModelJudge(ScriptedEngine(scorer=scorer)))
    return cfg


def test_pairs_inside_the_abstain_band_are_no_wins_and_are_counted_in_the_data_report(tmp_path):
    cfg = judged_run(tmp_path, abstain=0.5)
    recs = load_labelled(cfg.out)
    small = [r for r in recs if abs(r["margin"]) < 0.5]
    assert small and len(small) < len(recs)
    assert all(r["abstain"] and r["label"] == 0 for r in small)
    assert all(r["label"] == 1 and not r["abstain"] for r in recs if r not in small)
    assert load_labelled(cfg.out, abstain_margin=0.0)[0]["abstain"] is False  # the band is read, not stored
    summary = RunDir(cfg.out).read_json("summary.json")
    assert sum(row["abstained"] for row in summary["data_report"]["domains"].values()) == len(small)
    assert gate_records(recs) == [r for r in recs if r not in small]


def test_the_gate_stage_leaves_the_abstained_pairs_out(tmp_path, tiny_model):
    cfg = judged_run(tmp_path, abstain=0.5)
    recs = load_labelled(cfg.out)
    info = run_gate(RunDir(cfg.out), cfg, recs, *tiny_model)
    assert info["n_train"] + info["n_heldout"] == len([r for r in recs if not r["abstain"]]) < len(recs)
