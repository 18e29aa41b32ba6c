"""`prism eval` with a real (tiny) PRISM artifact: lora, prism and oracle systems, routing per category."""

from __future__ import annotations

import json
from pathlib import Path

from prism_persona.cli import main

FIX = Path(__file__).resolve().parents[1] / "fixtures"


def _tiny_artifact(model_dir, out: Path) -> Path:
    """A gated artifact on the tiny model: random non-zero LoRA on q/v of layers 1..L-1, random gate."""
    from prism_persona.testing import make_tiny_artifact

    return make_tiny_artifact(
        model_dir,
        out,
        target_modules=("q_proj", "v_proj"),
        cache=False,
        queries=("Write a haiku about rain.", "What is 12 * 12?", "hello", "fix my code"),
    )


def test_eval_with_prism_artifact(tmp_path, monkeypatch, tiny_model_dir):
    art = _tiny_artifact(tiny_model_dir, tmp_path / "run" / "prism")
    (tmp_path / "myjudge2.py").write_text(
        "def judge(prompt):\n"
        "    if 'yes or no' in prompt:\n        return 'no'\n"
        "    if '[[A]]' in prompt:\n        return '[[A]]'\n"
        "    return '[[5]]' if 'haiku' in prompt else '[[3]]'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    args = [
        "eval",
        "--prism",
        str(art),
        "--systems",
        "base,lora,prism,oracle",
        "--grader",
        "myjudge2:judge",
        "--benchmarks",
        "mmlu,mtbench,pku",
        "--mmlu",
        str(FIX / "mmlu_hf.jsonl"),
        "--mtbench",
        str(FIX / "mtbench_small.jsonl"),
        "--pku",
        str(FIX / "pku_small.json"),
        "--limit",
        "3",
        "--answer-tokens",
        "3",
        "--safety-tokens",
        "3",
        "--resamples",
        "50",
        "--out",
        str(tmp_path / "ev"),
        "-q",
    ]
    assert main(args) == 0
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert res["systems"] == ["base", "lora", "prism", "oracle"]
    rt = res["mtbench"]["prism"]["routing"]
    assert rt["all"]["n"] == 3 and 0.0 <= rt["all"]["mean"] <= 1.0  # 3 questions, by their first turn
    assert res["mmlu"]["prism"]["routing"]["all"]["n"] == 3  # MMLU routing via GatedModel.route
    assert res["safety"]["prism"]["pku"]["routing"]["n"] == 3
    assert "routing" not in res["mtbench"]["lora"] and "routing" not in res["mtbench"]["base"]
    # oracle is never worse than base or lora
    for b in ("mmlu",):
        assert res[b]["oracle"]["accuracy"]["mean"] >= max(
            res[b]["base"]["accuracy"]["mean"], res[b]["lora"]["accuracy"]["mean"]
        )
    assert res["mtbench"]["oracle"]["score"]["mean"] >= res["mtbench"]["base"]["score"]["mean"] - 1e-9
    assert (tmp_path / "ev" / "routing.png").read_bytes().startswith(b"\x89PNG")
    # judges.ModelJudge's pairwise prompt gets '[[3]]' back from this callable: unreadable verdicts are
    # counted as unparseable and scored as ties, never as wins
    wr = res["mtbench"]["lora"]["win_rate"]
    assert wr["ties"] == 3 and wr["unparseable"] == 3 and wr["wins"] == wr["losses"] == 0 and wr["mean"] == 0.5
    recs = [json.loads(line) for line in (tmp_path / "ev" / "responses.jsonl").read_text().splitlines()]
    assert {r["system"] for r in recs} == {"base", "lora", "prism"}
