"""One smoke run of `evaluate` on the real embedded SmolLM2-135M-Instruct (slow; tiny limits)."""

from __future__ import annotations

from pathlib import Path

import pytest

FIX = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.mark.slow
def test_smoke_eval_on_embedded_model(tmp_path, embedded_model, shared_benchmarks):
    from prism_persona.engines.hf import HFEngine
    from prism_persona.evals.benchmarks.mmlu import load_mmlu
    from prism_persona.evals.benchmarks.mtbench import load_mtbench
    from prism_persona.evals.benchmarks.safety import load_safety
    from prism_persona.evals.evaluate import Benchmarks, evaluate
    from prism_persona.evals.report import eval_figures, eval_markdown
    from prism_persona.evals.runner import EvalRunner
    from prism_persona.evals.settings import EvalConfig
    from prism_persona.evals.systems import PersonaBook, fixed_provider, parse_systems
    from prism_persona.judges import EvalJudge

    model, tok = embedded_model
    eng = HFEngine(model, tok, batch_size=4, quiet=True, model_name="smollm2")
    bench = Benchmarks(
        mmlu=load_mmlu(FIX / "mmlu_original", limit=4),
        mtbench=load_mtbench(Path(shared_benchmarks) / "mt_bench_questions.jsonl", limit=2),
        safety={"harmbench": load_safety("harmbench", Path(shared_benchmarks) / "harmbench_behaviors.csv", limit=2)},
    )
    runner = EvalRunner(
        tmp_path / "out",
        fixed_provider({"base": eng}),
        EvalJudge(eng, "self", max_new_tokens=12),
        PersonaBook(),
        EvalConfig(answer_tokens=16, safety_tokens=16, resamples=100),
    )
    res, _ = evaluate(runner, parse_systems("base,persona"), bench)
    for s in ("base", "persona"):
        acc = res["mmlu"][s]["accuracy"]
        assert acc["n"] == 4 and 0.0 <= acc["lo"] <= acc["mean"] <= acc["hi"] <= 1.0
        assert res["mtbench"][s]["n_grades"] == 4
        assert res["safety"][s]["harmbench"]["method"] == {"logprob": 2}  # HF engines can score
    assert res["mtbench"]["persona"]["win_rate"]["n"] == 2
    figs = eval_figures(res, tmp_path / "out")
    assert all(Path(p).stat().st_size > 1000 for p in figs.values())
    assert "MMLU" in eval_markdown(res, figs)
    # resuming regenerates nothing
    before = eng.tokens_generated
    evaluate(
        EvalRunner(
            tmp_path / "out",
            fixed_provider({"base": eng}),
            EvalJudge(eng, "self", max_new_tokens=12),
            PersonaBook(),
            EvalConfig(answer_tokens=16, safety_tokens=16, resamples=100),
        ),
        parse_systems("base,persona"),
        bench,
    )
    assert eng.tokens_generated == before
