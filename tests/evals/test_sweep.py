"""Threshold trade-off from cached results, and routing vs persona effect per category."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from prism_persona.cli import main
from prism_persona.evals.benchmarks.mmlu import MMLUItem
from prism_persona.evals.benchmarks.mtbench import MTBenchItem
from prism_persona.evals.benchmarks.safety import SafetyItem
from prism_persona.evals.evaluate import Benchmarks
from prism_persona.evals.sweep import routing_vs_effect, threshold_sweep, thresholds

FIX = Path(__file__).resolve().parents[1] / "fixtures"


def _bench():
    mmlu = [MMLUItem(f"anatomy/{i}", "anatomy", "q", ("a", "b", "c", "d"), 0) for i in range(4)]
    mt = [MTBenchItem(str(i), "writing" if i < 2 else "math", ("t",)) for i in range(4)]
    return Benchmarks(mmlu=mmlu, mtbench=mt, safety={"benign": [SafetyItem("benign/0", "benign", "p")]})


def _per_item():
    ids = [f"anatomy/{i}" for i in range(4)]
    return {
        "mmlu": {
            "base": dict(zip(ids, [1.0, 1.0, 0.0, 0.0])),
            "lora": dict(zip(ids, [0.0, 1.0, 1.0, 1.0])),
            "persona": dict(zip(ids, [1.0, 0.0, 0.0, 0.0])),
        },
        "mtbench": {
            "base": {"0": 2.0, "1": 2.0, "2": 5.0, "3": 5.0},
            "lora": {"0": 6.0, "1": 4.0, "2": 5.0, "3": 3.0},
            "persona": {"0": 7.0, "1": 5.0, "2": 5.0, "3": 4.0},
        },
        "safety": {"base": {"benign/0": 0.0}, "lora": {"benign/0": 1.0}, "persona": {"benign/0": 1.0}},
        "gate": {
            "prism": {
                "mmlu": dict(zip(ids, [0.9, 0.2, 0.6, 0.1])),
                "mtbench": {"0": 0.8, "1": 0.7, "2": 0.3, "3": 0.1},
                "benign": {"benign/0": 0.55},
            }
        },
    }


def test_thresholds_cover_every_decision():
    ts = thresholds([0.2, 0.8, 0.5, 0.5])
    assert ts[0] == math.inf and ts[-1] == -math.inf and ts[1:-1] == [0.8, 0.65, 0.35]


def test_sweep_mixes_base_and_lora_by_gate_probability():
    sw = threshold_sweep(_per_item(), _bench(), threshold=0.5)
    assert sw["benchmarks"] == ["mmlu", "mtbench", "benign"]
    base, lora, prism = sw["marks"]["base"], sw["marks"]["lora"], sw["marks"]["prism"]
    assert (base["mmlu"], base["mtbench"], base["benign"], base["routed"]) == (0.5, 3.5, 0.0, 0.0)
    assert (lora["mmlu"], lora["mtbench"], lora["benign"], lora["routed"]) == (0.75, 4.5, 1.0, 1.0)
    # t=0.5 routes mmlu 0 and 2 (0.9, 0.6), mtbench 0 and 1, the benign item (0.55)
    assert prism["mmlu"] == pytest.approx((0.0 + 1.0 + 1.0 + 0.0) / 4)
    assert prism["mtbench"] == pytest.approx((6.0 + 4.0 + 5.0 + 5.0) / 4)
    assert prism["benign"] == 1.0 and prism["routed"] == pytest.approx(5 / 9)
    assert sw["marks"]["persona"]["mmlu"] == 0.25 and sw["marks"]["persona"]["mtbench"] == 5.25
    # the curve runs from base to lora, monotone in the routed share
    routed = [p["routed"] for p in sw["points"]]
    assert routed == sorted(routed) and sw["points"][0]["mmlu"] == 0.5 and sw["points"][-1]["mmlu"] == 0.75


def test_routing_vs_effect_per_category():
    rv = routing_vs_effect(_per_item(), _bench(), threshold=0.5)
    pts = {p["category"]: p for p in rv["mtbench"]["points"]}
    assert pts["writing"]["routed"] == 1.0 and pts["writing"]["effect"] == 4.0
    assert pts["math"]["routed"] == 0.0 and pts["math"]["effect"] == pytest.approx(-0.5)
    assert rv["mtbench"]["pearson"] == pytest.approx(1.0) and rv["mtbench"]["spearman"] == pytest.approx(1.0)
    assert rv["mmlu"]["pearson"] is None  # one MMLU group: no correlation


def test_sweep_without_gate_is_empty():
    per = _per_item()
    del per["gate"]
    assert threshold_sweep(per, _bench())["points"] == []


def test_eval_sweep_reproduces_the_measured_prism_numbers(tmp_path, monkeypatch, tiny_model_dir):
    """At the artifact's threshold the sweep (base/lora mixed by gate probability) equals what the
    prism system measured by generating: the premise that lets the sweep skip regeneration."""
    from prism_persona.testing import make_tiny_artifact

    art = make_tiny_artifact(tiny_model_dir, tmp_path / "run" / "prism")
    (tmp_path / "sweepjudge.py").write_text(
        "def judge(prompt):\n"
        "    if 'yes or no' in prompt:\n        return 'yes' if 'fake' in prompt else 'no'\n"
        "    return '[[%d]]' % (1 + len(prompt) % 9)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "ev"
    args = [
        "eval",
        "--prism",
        str(art),
        "--systems",
        "base,persona,lora,prism",
        "--grader",
        "sweepjudge:judge",
        "--benchmarks",
        "mmlu,mtbench,pku",
        "--mmlu",
        str(FIX / "mmlu_hf.jsonl"),
        "--mtbench",
        str(FIX / "mtbench_small.jsonl"),
        "--pku",
        str(FIX / "pku_small.json"),
        "--limit",
        "4",
        "--answer-tokens",
        "3",
        "--safety-tokens",
        "3",
        "--resamples",
        "20",
        "--no-pairwise",
        "--out",
        str(out),
        "-q",
    ]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    sw = json.loads((out / "sweep.json").read_text())
    prism = sw["sweep"]["marks"]["prism"]
    assert prism["mmlu"] == pytest.approx(res["mmlu"]["prism"]["accuracy"]["mean"])
    assert prism["pku"] == pytest.approx(res["safety"]["prism"]["pku"]["refusal"]["mean"])
    assert prism["mtbench"] == pytest.approx(res["mtbench"]["prism"]["score"]["mean"])
    assert prism["routed"] is not None and sw["threshold"] is not None
    assert (out / "tradeoff.png").read_bytes().startswith(b"\x89PNG")
    assert (out / "routing_vs_effect_all.png").read_bytes().startswith(b"\x89PNG")
    assert "Gate threshold trade-off" in (out / "report.md").read_text()
    # MT-Bench answers and grades also land in FastChat's layout, one answer file per system
    assert sorted(f.name for f in (out / "fastchat" / "model_answer").iterdir()) == [
        "base.jsonl",
        "lora.jsonl",
        "persona.jsonl",
        "prism.jsonl",
    ]
    assert (out / "fastchat" / "model_judgment" / "callable_sweepjudge_judge_single.jsonl").stat().st_size > 0
