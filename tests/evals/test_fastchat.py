"""FastChat llm_judge files: model_answer / model_judgment (single and pairwise, both orders) written by
prism eval, and FastChat answer files read back as another system's answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prism_persona.errors import PrismError
from prism_persona.evals.benchmarks.mmlu import load_mmlu
from prism_persona.evals.benchmarks.mtbench import load_mtbench
from prism_persona.evals.evaluate import Benchmarks, evaluate, systems_to_run
from prism_persona.evals.fastchat import read_answers, write_fastchat
from prism_persona.evals.report import eval_markdown
from prism_persona.evals.runner import EvalRunner
from prism_persona.evals.settings import EvalConfig
from prism_persona.evals.systems import PersonaBook, SystemSpec, fixed_provider, parse_systems
from prism_persona.judges import EvalJudge, Verdict
from prism_persona.testing import ScriptedEngine

FIX = Path(__file__).resolve().parents[1] / "fixtures"


class LongerWins:
    """Prefers the longer answer; 'A' when equally long (a position bias the swap must expose)."""

    def compare(self, items):
        return [Verdict("A" if len(i.answer_a) >= len(i.answer_b) else "B", {}) for i in items]


def _grade(chat):
    p = chat[-1]["content"]
    return "no rating here" if "reverse" in p and "Assistant's Answer" in p else ("[[8]]" if "longer" in p else "[[3]]")


def _runner(tmp_path, engines):
    judge = EvalJudge(ScriptedEngine(responder=_grade), "gpt-4/judge", pair_judge=LongerWins())
    return EvalRunner(
        tmp_path / "out", fixed_provider(engines), judge, PersonaBook({}), EvalConfig(answer_tokens=8, resamples=20)
    )


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_written_files_follow_fastchat_formats(tmp_path):
    items = load_mtbench(FIX / "mtbench_small.jsonl")
    engines = {
        "base": ScriptedEngine(responder=lambda c: "short"),
        "lora": ScriptedEngine(responder=lambda c: "a much longer answer"),
    }
    r = _runner(tmp_path, engines)
    specs = parse_systems("base,lora")
    evaluate(r, specs, Benchmarks(mtbench=items))
    generated = r.count.generated
    w = write_fastchat(tmp_path / "fc", r, systems_to_run(specs), items)
    assert r.count.generated == generated  # written from the cache

    answers = _lines(tmp_path / "fc" / "model_answer" / "lora.jsonl")
    assert len(answers) == 6 and set(answers[0]) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
    assert answers[0]["question_id"] == 1 and answers[0]["model_id"] == "lora"
    assert answers[0]["choices"] == [{"index": 0, "turns": ["a much longer answer", "a much longer answer"]}]

    single = _lines(w["single"])
    assert w["single"].name == "gpt-4_judge_single.jsonl" and len(single) == 24  # 2 systems x 6 q x 2 turns
    row = next(s for s in single if s["model"] == "lora" and s["question_id"] == 1 and s["turn"] == 2)
    assert set(row) == {"question_id", "model", "judge", "user_prompt", "judgment", "score", "turn", "tstamp"}
    assert row["judge"] == ["gpt-4/judge", "prism-single-v1-multi-turn"] and row["score"] == 8.0
    assert "a much longer answer" in row["user_prompt"] and row["judgment"] == "[[8]]"
    bad = [s for s in single if s["score"] == -1]  # unparseable grades, written as FastChat does
    assert len(bad) == 2 and all(s["question_id"] == 3 and s["turn"] == 1 for s in bad)

    pair = _lines(w["pair"])
    assert len(pair) == 6 and all(p["model_1"] == "lora" and p["model_2"] == "base" for p in pair)
    # lora's longer answer wins when shown first (g1) and when shown second (g2)
    assert {(p["g1_winner"], p["g2_winner"]) for p in pair} == {("model_1", "model_1")}
    assert set(pair[0]) >= {"question_id", "model_1", "model_2", "g1_winner", "g2_winner", "judge", "turn", "tstamp"}

    # read the way FastChat's show_result.py reads them (pandas JSON lines, -1 = unparseable dropped)
    pd = pytest.importorskip("pandas")
    df = pd.read_json(w["single"], lines=True)
    df = df[df["score"] != -1]
    means = df.groupby(["model", "turn"])["score"].mean()
    assert means[("lora", 1)] == 8.0 and means[("base", 2)] == 3.0
    pf = pd.read_json(w["pair"], lines=True)
    assert (pf["g1_winner"] == pf["g2_winner"]).all() and set(pf["model_2"]) == {"base"}


def test_position_bias_shows_as_split_orders(tmp_path):
    items = load_mtbench(FIX / "mtbench_small.jsonl", limit=2)
    same_len = {"base": ScriptedEngine(responder=lambda c: "xxxx"), "lora": ScriptedEngine(responder=lambda c: "yyyy")}
    r = _runner(tmp_path, same_len)
    specs = parse_systems("base,lora")
    evaluate(r, specs, Benchmarks(mtbench=items))
    pair = _lines(write_fastchat(tmp_path / "fc", r, systems_to_run(specs), items)["pair"])
    # the judge says "A" in both orders: model_1 when lora is A, model_2 when base is A
    assert {(p["g1_winner"], p["g2_winner"]) for p in pair} == {("model_1", "model_2")}


def test_fastchat_answers_become_a_system(tmp_path):
    items = load_mtbench(FIX / "mtbench_small.jsonl")
    folder = tmp_path / "model_answer"
    folder.mkdir()
    with open(folder / "vicuna-7b.jsonl", "w") as fh:  # FastChat's gen_model_answer.py line format
        for it in items:
            fh.write(
                json.dumps(
                    {
                        "question_id": int(it.item_id),
                        "answer_id": "abc",
                        "model_id": "vicuna-7b",
                        "choices": [{"index": 0, "turns": ["a much longer answer", "t2 longer"]}],
                        "tstamp": 1.0,
                    }
                )
                + "\n"
            )
    ext = read_answers(folder)
    assert list(ext) == ["vicuna-7b"] and ext["vicuna-7b"]["1"] == ["a much longer answer", "t2 longer"]
    r = _runner(tmp_path, {"base": ScriptedEngine(responder=lambda c: "short")})
    r.external_answers = ext
    specs = parse_systems("base") + [SystemSpec("answers", domain="vicuna-7b")]
    mmlu = load_mmlu(FIX / "mmlu_hf.jsonl")
    res, _ = evaluate(r, specs, Benchmarks(mtbench=items, mmlu=mmlu[:1]))
    assert res["systems"] == ["base", "vicuna-7b"]
    assert res["mtbench"]["vicuna-7b"]["win_rate"]["wins"] == 6 and "vicuna-7b" not in res["mmlu"]
    assert r.count.generated == 12 + 1  # base: 6 x 2 turns + 1 MMLU answer; nothing for the file system
    assert "vicuna-7b" in eval_markdown(res, {})
    # round trip: what prism writes, prism (and FastChat's load_model_answers) reads back
    w = write_fastchat(tmp_path / "fc", r, systems_to_run(specs), items)
    back = read_answers(tmp_path / "fc" / "model_answer")
    assert back["vicuna-7b"] == ext["vicuna-7b"] and back["base"]["2"] == ["short", "short"]
    assert len(w["answers"]) == 2


def test_bad_fastchat_answers_are_one_line(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text(json.dumps({"question_id": 1, "choices": "nope"}) + "\n")
    with pytest.raises(PrismError, match=r"m.jsonl:1: 'choices\[0\].turns' must be a list"):
        read_answers(f)
    f.write_text(json.dumps({"question_id": 1, "choices": [{"index": 0, "turns": ["a", "b"]}]}) + "\n")
    r = _runner(tmp_path, {"base": ScriptedEngine(responder=lambda c: "x")})
    r.external_answers = read_answers(f)
    with pytest.raises(PrismError, match=r"FastChat answers of 'm' lack question\(s\) 3 \(have 1\)"):
        evaluate(
            r,
            [SystemSpec("answers", domain="m")],
            Benchmarks(mtbench=load_mtbench(FIX / "mtbench_small.jsonl", limit=2)),
        )
