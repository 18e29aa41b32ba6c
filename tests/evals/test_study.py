"""The persona study (exact lifts with scripted engines), figures and reports, and the CLI commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from prism_persona.cli import main
from prism_persona.evals.benchmarks.mmlu import load_mmlu
from prism_persona.evals.benchmarks.mtbench import load_mtbench
from prism_persona.evals.benchmarks.safety import load_safety
from prism_persona.evals.evaluate import Benchmarks, evaluate
from prism_persona.evals.format import fmt_ci
from prism_persona.evals.report import eval_figures, eval_markdown
from prism_persona.evals.runner import EvalRunner
from prism_persona.evals.settings import EvalConfig
from prism_persona.evals.study import run_study, study_figures, study_markdown
from prism_persona.evals.systems import PersonaBook, fixed_provider, load_persona_file, parse_systems
from prism_persona.judges import EvalJudge
from prism_persona.judges import Verdict as PairVerdict
from prism_persona.testing import ScriptedEngine

FIX = Path(__file__).resolve().parents[1] / "fixtures"
PNG = b"\x89PNG\r\n\x1a\n"


def _answer(chat):
    """'writer answer' with the writing persona anywhere, 'persona answer' with any other, else 'plain'."""
    text = " ".join(m["content"] for m in chat if m["role"] in ("system", "user"))
    if "writer" in text:
        return "writer answer"
    if "You are" in text:
        return "persona answer"
    return "plain"


GRADE = {"writer answer": "[[9]]", "persona answer": "[[7]]", "plain": "[[5]]"}


def _judge(chat):
    p = chat[-1]["content"]
    if "[The Start of Assistant's Answer]" in p:
        return GRADE[p.split("[The Start of Assistant's Answer]\n")[1].split("\n")[0]]
    if "### Assistant:" in p:
        return GRADE[p.rsplit("### Assistant:\n", 1)[1].split("\n")[0]]
    return "no"


class Gated(ScriptedEngine):
    """A fake gated engine: routes writing questions (haiku / limerick) to the 'LoRA'."""

    def generate(self, chats, params, desc=""):
        outs = super().generate(chats, params)
        for c, o in zip(chats, outs):
            first = next(m["content"] for m in c if m["role"] == "user")
            o.meta = {"routed": any(w in first for w in ("haiku", "limerick")), "gate_prob": 0.5}
        return outs


class LongerWins:
    def compare(self, items):
        return [
            PairVerdict(
                "A" if len(i.answer_a) > len(i.answer_b) else "B" if len(i.answer_b) > len(i.answer_a) else "tie", {}
            )
            for i in items
        ]


def _study_runner(tmp_path):
    engines = {
        "base": ScriptedEngine(responder=_answer, scorer=lambda c, ch: {x: -1.0 for x in ch}),
        "prism": Gated(responder=_answer),
    }
    judge = EvalJudge(ScriptedEngine(responder=_judge), "fake", mode="text", pair_judge=LongerWins())
    return EvalRunner(
        tmp_path / "study",
        fixed_provider(engines),
        judge,
        PersonaBook(load_persona_file(FIX / "personas.json")),
        EvalConfig(answer_tokens=8, safety_tokens=8, resamples=200),
    )


def _bench():
    return Benchmarks(
        mmlu=load_mmlu(FIX / "mmlu_hf.jsonl"),
        mtbench=load_mtbench(FIX / "mtbench_small.jsonl"),
        safety={"pku": load_safety("pku", FIX / "pku_small.json")},
    )


def test_study_exact_lifts_and_routing_correlation(tmp_path):
    study = run_study(_study_runner(tmp_path), _bench(), with_prism=True)
    m = study["matrix"]
    assert m["rows"] == ["writing", "coding", "safety"] and m["cols"] == ["coding", "math", "writing"]
    assert {c: m["lift"]["writing"][c]["mean"] for c in m["cols"]} == {"coding": 4.0, "math": 4.0, "writing": 4.0}
    assert {c: m["lift"]["coding"][c]["mean"] for c in m["cols"]} == {"coding": 2.0, "math": 2.0, "writing": 2.0}
    assert m["lift"]["safety"]["math"]["n"] == 2
    assert m["matched"] == {"coding": "coding", "math": "generic:math", "writing": "writing"}
    eff = study["effects"]["MT-Bench score"]
    # expert (matched): writing qs get the writer (+4), coding and math qs a non-writer persona (+2)
    assert eff["expert"]["lift"]["mean"] == pytest.approx((2 * 4 + 4 * 2) / 6)
    assert eff["base"]["value"]["mean"] == 5.0
    assert eff["min"]["lift"]["mean"] == eff["expert"]["lift"]["mean"]  # "You are a writer." still says writer
    assert eff["random"]["lift"]["n"] == 6 and eff["user"]["lift"]["mean"] == eff["expert"]["lift"]["mean"]
    rv = study["routing_vs_effect"]
    pts = {p["category"]: (p["routed"], p["effect"]) for p in rv["points"]}
    assert pts == {"writing": (1.0, 4.0), "coding": (0.0, 2.0), "math": (0.0, 2.0)}
    assert rv["pearson"] == pytest.approx(1.0) and rv["spearman"] == pytest.approx(1.0)
    assert set(study["effects"]) == {"MMLU accuracy", "MT-Bench score", "pku refusal"}


def test_study_resume_and_report_files(tmp_path):
    runner = _study_runner(tmp_path)
    study = run_study(runner, _bench(), with_prism=True)
    n_gen = len(runner.provider.get("base").calls)
    again = _study_runner(tmp_path)
    study2 = run_study(again, _bench(), with_prism=True)
    assert again.provider.get("base").calls == [] and n_gen > 0
    assert study2["matrix"] == study["matrix"]
    figs = study_figures(study, tmp_path / "study")
    study["eval_figures"] = eval_figures(study["results"], tmp_path / "study")
    assert set(figs) == {"heatmap", "effects", "routing_vs_effect"}
    assert {"mmlu", "mtbench", "safety", "routing"} <= set(study["eval_figures"])
    for p in list(figs.values()) + list(study["eval_figures"].values()):
        data = Path(p).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    md = study_markdown(study, figs, ["model: fake"])
    assert "![heatmap](heatmap.png)" in md and "Spearman rho = +1.00" in md
    assert "| writing |" in md and "MMLU" in md
    json.dumps(study, default=str)  # serialisable


def test_eval_markdown_has_every_number_with_ci_and_n(tmp_path):
    runner = _study_runner(tmp_path)
    res, _ = evaluate(runner, parse_systems("base,persona,prism"), _bench())
    figs = eval_figures(res, tmp_path / "figs")
    md = eval_markdown(res, figs)
    assert fmt_ci(res["mtbench"]["base"]["score"]) in md and "(n=12)" in md
    assert "Routed to the LoRA" in md and "![mtbench](mtbench.png)" in md
    assert fmt_ci({"mean": 0.5, "lo": 0.25, "hi": 0.75, "n": 8}, pct=True) == "50.0% [25.0, 75.0] (n=8)"
    assert fmt_ci({"mean": float("nan"), "lo": 0, "hi": 0, "n": 0}) == "-"


# ------------------------------------------------------------------------------------------ CLI


def _judge_module(tmp_path, monkeypatch):
    (tmp_path / "myjudge.py").write_text(
        "def judge(prompt):\n"
        "    if 'Answer with one word: yes or no' in prompt:\n"
        "        return 'no'\n"
        "    if '[[A]]' in prompt:\n"
        "        return '[[C]]'\n"
        "    return '[[6]]'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))


def test_cli_eval_and_study_on_tiny_model(tmp_path, monkeypatch, tiny_model_dir, capsys):
    _judge_module(tmp_path, monkeypatch)
    common = [
        "--model",
        str(tiny_model_dir),
        "--grader",
        "myjudge:judge",
        "--answer-tokens",
        "3",
        "--safety-tokens",
        "3",
        "--mtbench",
        str(FIX / "mtbench_small.jsonl"),
        "--pku",
        str(FIX / "pku_small.json"),
        "--mmlu",
        str(FIX / "mmlu_original"),
        "--benchmarks",
        "mmlu,mtbench,pku",
        "--limit",
        "3",
        "--resamples",
        "100",
        "-q",
        "--persona-json",
        str(FIX / "personas.json"),
    ]
    assert main(["eval", "--systems", "base,persona/min/user", "--out", str(tmp_path / "ev")] + common) == 0
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert res["counts"] == {"mmlu": 3, "mtbench": 3, "pku": 3}
    assert (
        res["mtbench"]["base"]["score"]["mean"] == 6.0 and res["mtbench"]["persona/min/user"]["win_rate"]["ties"] == 3
    )
    assert res["safety"]["base"]["pku"]["refusal"]["mean"] == 0.0
    assert (tmp_path / "ev" / "mmlu.png").read_bytes().startswith(PNG)
    assert "MT-Bench" in (tmp_path / "ev" / "report.md").read_text()
    assert main(["study", "--out", str(tmp_path / "st")] + common) == 0
    st = json.loads((tmp_path / "st" / "study.json").read_text())
    assert st["matrix"]["rows"] == ["writing", "coding", "safety"]
    assert (tmp_path / "st" / "heatmap.png").stat().st_size > 1000 and (tmp_path / "st" / "study.md").exists()


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["eval", "--systems", "base,gpt4"], "unknown system 'gpt4'"),
        (["eval", "--systems", "base,prism"], "need --prism"),
        # no local copy and the hub unreachable (tests run offline): the line names the override flag
        (["eval", "--benchmarks", "mmlu"], "from the Hugging Face hub (Couldn't reach 'cais/mmlu'"),
        (["eval", "--benchmarks", "mmlu"], "pass a local copy with --mmlu PATH"),
        (["eval", "--benchmarks", "mmlu", "--mmlu", "nope.jsonl"], "MMLU file not found"),
        (["eval", "--benchmarks", "mtbench"], "pass a local copy with --mtbench PATH"),
        (["eval", "--benchmarks", "mtbench", "--mtbench", "nope.jsonl"], "MT-Bench file not found"),
        (["eval", "--benchmarks", "hellaswag"], "unknown benchmark"),
        (["study", "--benchmarks", "pku", "--pku", "missing.json"], "pku file not found"),
    ],
)
def test_cli_errors_are_one_line(argv, msg, capsys, monkeypatch, tmp_path):
    datasets_config = pytest.importorskip("datasets.config")
    monkeypatch.setattr(datasets_config, "HF_DATASETS_CACHE", tmp_path / "empty-cache")
    monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", True, raising=False)
    assert main(argv + ["-q"]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.subprocess
def test_help_stays_light():
    code = (
        "import sys; from prism_persona.cli import build_parser; build_parser(); "
        "print(any(m in sys.modules for m in ('torch', 'transformers', 'matplotlib')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_study_matrix_domains_subset(tmp_path):
    from prism_persona.errors import PrismError

    bench = Benchmarks(mtbench=load_mtbench(FIX / "mtbench_small.jsonl"))
    study = run_study(_study_runner(tmp_path), bench, matrix_domains=["coding"])
    assert study["matrix"]["rows"] == ["coding"] and "routing_vs_effect" not in study
    with pytest.raises(PrismError, match="no persona for astrology"):
        run_study(_study_runner(tmp_path), bench, matrix_domains=["astrology"])
