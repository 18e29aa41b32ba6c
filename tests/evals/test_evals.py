"""Evaluation: loaders, statistics, judge parsing, exact numbers with scripted engines, caching."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from prism_persona.errors import PrismError
from prism_persona.evals.benchmarks.mmlu import GROUPS, SUBJECT_GROUP, load_mmlu, subject_group
from prism_persona.evals.benchmarks.mtbench import MTBench, load_mtbench
from prism_persona.evals.benchmarks.safety import load_safety
from prism_persona.evals.evaluate import Benchmarks, evaluate
from prism_persona.evals.runner import EvalRunner
from prism_persona.evals.settings import EvalConfig
from prism_persona.evals.systems import PersonaBook, fixed_provider, load_persona_file, parse_system, parse_systems
from prism_persona.judges import EvalJudge, keyword_refusal, parse_rating, parse_yes_no
from prism_persona.stats import bootstrap_ci, pearson, ranks, spearman
from prism_persona.testing import ScriptedEngine

FIX = Path(__file__).resolve().parents[1] / "fixtures"


# ------------------------------------------------------------------------------------------ loaders


def test_mmlu_original_layout():
    items = load_mmlu(FIX / "mmlu_original")
    assert len(items) == 10
    assert {it.subject for it in items} == {
        "abstract_algebra",
        "world_religions",
        "marketing",
        "high_school_macroeconomics",
    }
    first = [it for it in items if it.subject == "abstract_algebra"][0]
    assert first.item_id == "abstract_algebra/0" and first.answer == 2 and first.choices == ("0", "1", "2", "4")
    assert len({it.item_id for it in items}) == 10


@pytest.mark.parametrize("name", ["mmlu_hf.jsonl", "mmlu_hf.json", "mmlu_hf.csv"])
def test_mmlu_hf_layouts_agree(name):
    items = load_mmlu(FIX / name)
    assert [(it.subject, it.question, it.choices, it.answer) for it in items] == [
        (it.subject, it.question, it.choices, it.answer) for it in load_mmlu(FIX / "mmlu_hf.jsonl")
    ]
    assert len(items) == 6 and items[0].answer == 1 and items[0].choices == ("3", "4", "5", "6")


def test_mmlu_subjects_and_limit():
    items = load_mmlu(FIX / "mmlu_original", subjects=["marketing"])
    assert [it.subject for it in items] == ["marketing"] * 3
    lim = load_mmlu(FIX / "mmlu_original", limit=4)
    assert len(lim) == 4 and len({it.subject for it in lim}) == 4  # round-robin over subjects
    with pytest.raises(PrismError, match="unknown MMLU subject"):
        load_mmlu(FIX / "mmlu_original", subjects=["astrology"])


def test_mmlu_parquet_when_pyarrow(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (FIX / "mmlu_hf.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test-00000.parquet")
    assert len(load_mmlu(tmp_path)) == 6


def test_mmlu_csv_numpy_style_choices(tmp_path):
    f = tmp_path / "m.csv"
    f.write_text("question,subject,choices,answer\nQ?,anatomy,['a' 'b' 'c' 'd'],3\n")
    assert load_mmlu(f)[0].choices == ("a", "b", "c", "d")


@pytest.mark.parametrize(
    "content,name,match",
    [
        ("", "x.jsonl", "empty"),
        ('{"question": "q", "subject": "s", "answer": 1}\n', "x.jsonl", r"x.jsonl:1: missing column\(s\) choices"),
        (
            '{"question": "q", "choices": ["a","b","c","d"], "answer": 1}\n{"question": "q", "choices": ["a"], "answer": 1}\n',
            "x.jsonl",
            r"x.jsonl:2: 'choices' must be a list of 4",
        ),
        ('{"question": "q", "choices": ["a","b","c","d"], "answer": 7}\n', "x.jsonl", r"x.jsonl:1: bad answer 7"),
        ("not json\n", "x.jsonl", r"x.jsonl:1: not valid JSON"),
        ("q,a,b,c,d,E\n", "algebra_test.csv", r"algebra_test.csv:1: bad answer letter 'E'"),
        ("q,a,b,c,d,A\nq2,a,b,c\n", "algebra_test.csv", r"algebra_test.csv:2: expected 6 columns"),
        ("foo,bar\n1,2\n", "y.csv", "needs a header with question"),
    ],
)
def test_mmlu_errors_name_file_and_line(tmp_path, content, name, match):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(PrismError, match=match):
        load_mmlu(f if not name.endswith("_test.csv") else tmp_path)


def test_missing_files_are_clear(tmp_path):
    with pytest.raises(PrismError, match="MMLU file not found"):
        load_mmlu(tmp_path / "nope")
    with pytest.raises(PrismError, match="MT-Bench file not found"):
        load_mtbench(tmp_path / "nope.jsonl")
    bad = tmp_path / "mt.jsonl"
    bad.write_text('{"question_id": 1, "category": "x", "turns": []}\n')
    with pytest.raises(PrismError, match=r"mt.jsonl:1: 'turns' must be a non-empty list"):
        load_mtbench(bad)
    hb = tmp_path / "hb.csv"
    hb.write_text("Goal,Other\nx,y\n")
    with pytest.raises(PrismError, match="needs a 'Behavior' column"):
        load_safety("harmbench", hb)
    js = tmp_path / "j.json"
    js.write_text('["ok", ""]')
    with pytest.raises(PrismError, match=r"j.json: item 2: expected a non-empty prompt"):
        load_safety("jailbreak", js)


def test_fixture_safety_and_mtbench_loaders():
    hb = load_safety("harmbench", FIX / "harmbench_small.csv")
    assert len(hb) == 3 and hb[0].item_id == "harmbench/lockpick_house"
    assert hb[2].prompt.startswith("Some article text.") and hb[2].prompt.endswith("argue the claim is true")
    assert len(load_safety("pku", FIX / "pku_small.json", limit=2)) == 2
    mt = load_mtbench(FIX / "mtbench_small.jsonl", limit=3)
    assert {it.category for it in mt} == {"writing", "coding", "math"}
    assert load_mtbench(FIX / "mtbench_small.jsonl")[2].reference[0].startswith("def rev")


def test_real_shared_benchmarks(shared_benchmarks):
    mt = load_mtbench(os.path.join(shared_benchmarks, "mt_bench_questions.jsonl"))
    assert len(mt) == 80 and all(len(it.turns) == 2 for it in mt)
    assert len({it.category for it in mt}) == 8
    eight = load_mtbench(os.path.join(shared_benchmarks, "mt_bench_questions.jsonl"), limit=8)
    assert len({it.category for it in eight}) == 8
    hb = load_safety("harmbench", os.path.join(shared_benchmarks, "harmbench_behaviors.csv"))
    assert len(hb) >= 100 and len({it.item_id for it in hb}) == len(hb)
    assert len(load_safety("jailbreak", os.path.join(shared_benchmarks, "jailbreak_prompts.json"))) > 10
    assert len(load_safety("pku", os.path.join(shared_benchmarks, "pku_saferlhf_prompts.json"))) > 10


def test_subject_groups_are_complete():
    assert len(SUBJECT_GROUP) == 57
    counts = {g: sum(1 for v in SUBJECT_GROUP.values() if v == g) for g in GROUPS}
    assert counts == {"STEM": 18, "Humanities": 13, "Social Sciences": 12, "Other": 14}
    assert subject_group("college_physics") == "STEM" and subject_group("not_a_subject") == "Other"


# ------------------------------------------------------------------------------------------ stats


def test_bootstrap_ci_contains_mean_and_shrinks():
    small = bootstrap_ci([1, 0] * 10, seed=1)
    big = bootstrap_ci([1, 0] * 500, seed=1)
    for ci in (small, big):
        assert ci["lo"] <= ci["mean"] <= ci["hi"]
    assert small["mean"] == big["mean"] == 0.5 and small["n"] == 20 and big["n"] == 1000
    assert (big["hi"] - big["lo"]) < (small["hi"] - small["lo"]) / 3
    assert bootstrap_ci([1, 0, 1], seed=3) == bootstrap_ci([1, 0, 1], seed=3)  # seeded
    assert bootstrap_ci([])["n"] == 0 and bootstrap_ci([4.0]) == {"mean": 4.0, "lo": 4.0, "hi": 4.0, "n": 1}


def test_correlations():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 1, 1], [1, 2, 3]) is None
    assert ranks([10, 20, 20, 5]) == [2.0, 3.5, 3.5, 1.0]
    assert spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)  # monotone, not linear
    assert pearson([1, 2, 3, 4], [1, 4, 9, 100]) < 0.95
    # textbook example: Pearson of (1,2,3,4,5) vs (2,4,5,4,5) = 0.7746
    assert pearson([1, 2, 3, 4, 5], [2, 4, 5, 4, 5]) == pytest.approx(0.774597, abs=1e-5)


# ------------------------------------------------------------------------------------------ judge parsing


@pytest.mark.parametrize(
    "text,score",
    [
        ("[[7]] solid answer", 7.0),
        ("Rating: [[10]]", 10.0),
        ("Rating: 6", 6.0),
        ("rating is 3", 3.0),
        ("I give it 8/10.", 8.0),
        ("Score: 4", 4.0),
        ("[8.5]", 8.5),
        ("9\nGood.", 9.0),
        ("5 out of 10", 5.0),
        ("no idea", None),
        ("[[0]]", None),
        ("", None),
        ("The answer has 3 paragraphs", None),
    ],
)
def test_parse_rating(text, score):
    assert parse_rating(text) == score


def test_refusal_keyword_fallback_and_yes_no():
    assert keyword_refusal("I'm sorry, but I can't help with that.")
    assert keyword_refusal("As an AI, I cannot do this")
    assert keyword_refusal("")  # an empty answer complies with nothing
    assert not keyword_refusal("Sure! Step 1: preheat the oven.")
    assert parse_yes_no("Yes, it refused.") is True and parse_yes_no("no") is False
    assert parse_yes_no("maybe") is None


def test_refusal_judge_logprob_text_and_keyword():
    scorer = lambda chat, choices: {"Yes": -0.1, "yes": -3.0, "No": -2.0, "no": -4.0}
    lp = EvalJudge(ScriptedEngine(scorer=scorer), "s").refusals(["q"], ["Sure."])[0]
    assert lp["refused"] is True and lp["method"] == "logprob" and lp["keyword"] is False
    text = EvalJudge(ScriptedEngine(["No."]), "t").refusals(["q"], ["I'm sorry, I can't."])[0]
    assert text["refused"] is False and text["method"] == "text" and text["judge_text"] == "No."
    kw = EvalJudge(ScriptedEngine(["hmm?", "???"]), "k").refusals(["q", "q"], ["I cannot help.", "Sure."])
    assert [d["refused"] for d in kw] == [True, False] and {d["method"] for d in kw} == {"keyword"}


# ------------------------------------------------------------------------------------------ systems


def test_parse_systems_and_names():
    s = parse_system("persona@coding/min/user")
    assert (s.kind, s.domain, s.length, s.placement, s.name) == (
        "persona",
        "coding",
        "min",
        "user",
        "persona@coding/min/user",
    )
    assert parse_system("persona", length="long").name == "persona/long"
    assert [x.name for x in parse_systems("base,prism,oracle")] == ["base", "prism", "oracle"]
    for bad in ("gpt4", "lora/min", "random@coding", "persona/huge", ""):
        with pytest.raises(PrismError):
            parse_systems(bad)


def test_persona_matching_and_random():
    book = PersonaBook(load_persona_file(FIX / "personas.json"), seed=0)
    assert book.domain_for("writing") == "writing" and book.domain_for("roleplay") == "writing"
    assert book.domain_for("harmbench") == "safety" and book.domain_for("coding") == "coding"
    assert book.domain_for("math") is None  # no matching domain -> generic expert
    text, dom = book.for_item(parse_system("persona"), "math", "5")
    assert dom == "generic:math" and "mathematics" in text
    assert book.for_item(parse_system("persona/min"), "writing", "1") == ("You are a writer.", "writing")
    assert book.for_item(parse_system("persona"), "harmbench", "x")[0] == "You are a careful AI safety expert."
    for i in range(10):
        _, rdom = book.for_item(parse_system("random"), "writing", str(i))
        assert rdom in ("coding", "safety")
    assert book.random_for("writing", "3", "short") == book.random_for("writing", "3", "short")
    mapped = PersonaBook(book.personas, {"math": "coding"})
    assert mapped.domain_for("math") == "coding"
    with pytest.raises(PrismError, match="no persona"):
        PersonaBook(book.personas, {"math": "astrology"}).domain_for("math")


# ------------------------------------------------------------------------------------------ runs with fakes


class FakePairJudge:
    """Prefers the longer answer (a 'tie' if equally long); counts compare calls."""

    def __init__(self):
        self.items = 0

    def compare(self, items):
        from prism_persona.judges import Verdict as PairVerdict

        self.items += len(items)
        out = []
        for it in items:
            a, b = len(it.answer_a), len(it.answer_b)
            out.append(PairVerdict("A" if a > b else "B" if b > a else "tie", {}))
        return out


def _letter_scorer(right: dict):
    """Scores the correct letter highest, looked up by question text."""

    def scorer(chat, choices):
        q = chat[-1]["content"]
        ans = next(v for k, v in right.items() if k in q)
        return {c: (0.0 if c == ans else -2.0) for c in choices}

    return scorer


def _runner(tmp_path, engines, judge_engine=None, pair=None, personas=None, n=200):
    judge = EvalJudge(judge_engine or ScriptedEngine(responder=lambda c: "[[5]]"), "fake", pair_judge=pair)
    return EvalRunner(
        tmp_path / "out",
        fixed_provider(engines),
        judge,
        PersonaBook(personas or {}),
        EvalConfig(answer_tokens=16, safety_tokens=16, resamples=n),
    )


def test_mmlu_perfect_and_always_a(tmp_path):
    items = load_mmlu(FIX / "mmlu_original")
    right = {it.question: "ABCD"[it.answer] for it in items}
    perfect = ScriptedEngine(scorer=_letter_scorer(right))
    always_a = ScriptedEngine(scorer=lambda chat, choices: {c: (0.0 if c == "A" else -1.0) for c in choices})
    r = _runner(tmp_path, {"base": perfect, "lora": always_a})
    res, per = evaluate(r, parse_systems("base,lora"), Benchmarks(mmlu=items))
    assert res["mmlu"]["base"]["accuracy"]["mean"] == 1.0
    share_a = sum(it.answer == 0 for it in items) / len(items)
    assert res["mmlu"]["lora"]["accuracy"]["mean"] == pytest.approx(share_a) == 0.4
    assert res["mmlu"]["lora"]["groups"]["Humanities"]["mean"] == 1.0  # both world_religions answers are A
    assert res["mmlu"]["lora"]["groups"]["STEM"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0, "n": 3}
    assert res["mmlu"]["base"]["method"] == {"logprob": 10}


def test_mmlu_text_fallback_when_engine_cannot_score(tmp_path):
    items = load_mmlu(FIX / "mmlu_hf.jsonl")
    eng = ScriptedEngine(responder=lambda c: "The answer is B.")
    res, _ = evaluate(_runner(tmp_path, {"base": eng}), parse_systems("base"), Benchmarks(mmlu=items))
    assert res["mmlu"]["base"]["accuracy"]["mean"] == pytest.approx(2 / 6)
    assert res["mmlu"]["base"]["method"] == {"text": 6}


def test_mtbench_scores_unparseable_and_win_rate(tmp_path):
    items = load_mtbench(FIX / "mtbench_small.jsonl")
    base = ScriptedEngine(responder=lambda c: "short")
    lora = ScriptedEngine(responder=lambda c: "a much longer answer")
    grades = {"short": "[[4]]", "a much longer answer": "Rating: 8"}

    def judge(chat):
        p = chat[-1]["content"]
        last = (
            p.rsplit("### Assistant:\n", 1)[-1]
            if "### Assistant" in p
            else p.split("[The Start of Assistant's Answer]\n")[1]
        )
        ans = last.split("\n")[0]
        if "reverse" in p and "Assistant's Answer" in p:
            return "cannot rate"  # one unparseable grade per system (coding q3, turn 1)
        return grades[ans]

    pair = FakePairJudge()
    r = _runner(tmp_path, {"base": base, "lora": lora}, ScriptedEngine(responder=judge), pair)
    res, per = evaluate(r, parse_systems("base,lora,oracle"), Benchmarks(mtbench=items))
    b, lo, orc = res["mtbench"]["base"], res["mtbench"]["lora"], res["mtbench"]["oracle"]
    assert b["score"]["mean"] == 4.0 and b["score"]["n"] == 11 and b["unparseable"] == 1 and b["n_grades"] == 12
    assert lo["score"]["mean"] == 8.0 and lo["turns"]["2"]["n"] == 6
    assert lo["win_rate"]["mean"] == 1.0 and lo["win_rate"]["wins"] == 6
    assert lo["win_rate"]["categories"]["math"]["n"] == 2
    assert orc["score"]["mean"] == 8.0 and orc["win_rate"]["wins"] == 6
    assert pair.items == 12  # 6 items x both orders
    assert "win_rate" not in b
    assert per["mtbench"]["lora"]["5"] == 8.0


def test_safety_refusal_rates_and_audit(tmp_path):
    sets = {
        "harmbench": load_safety("harmbench", FIX / "harmbench_small.csv"),
        "pku": load_safety("pku", FIX / "pku_small.json"),
    }
    eng = ScriptedEngine(
        responder=lambda c: (
            "I'm sorry, I can't." if "lock" in c[-1]["content"] or "fake" in c[-1]["content"] else "Sure thing."
        )
    )
    judge = ScriptedEngine(responder=lambda c: "unclear")  # unparseable -> keyword fallback
    r = _runner(tmp_path, {"base": eng}, judge)
    res, _ = evaluate(r, parse_systems("base"), Benchmarks(safety=sets))
    assert res["safety"]["base"]["harmbench"]["refusal"]["mean"] == pytest.approx(1 / 3)
    assert res["safety"]["base"]["pku"]["refusal"]["mean"] == pytest.approx(1 / 3)
    assert res["safety"]["base"]["pku"]["method"] == {"keyword": 3}
    audit = [json.loads(line) for line in (tmp_path / "out" / "judgments.jsonl").read_text().splitlines()]
    assert len(audit) == 6 and all("response" in a and "refused" in a and "method" in a for a in audit)


def test_prism_routing_per_category(tmp_path):
    class Gated(ScriptedEngine):
        """Routes the first turn of writing questions; its second-turn meta says the opposite (a gated model
        keeps the first turn's decision: the routing counts each question once, by its first turn)."""

        def generate(self, chats, params, desc=""):
            outs = super().generate(chats, params)
            for c, o in zip(chats, outs):
                routed = "haiku" in c[0]["content"] or "limerick" in c[0]["content"]
                o.meta = {"routed": routed if len(c) == 1 else not routed, "gate_prob": 0.7}
            return outs

    items = load_mtbench(FIX / "mtbench_small.jsonl")
    r = _runner(
        tmp_path,
        {"base": ScriptedEngine(responder=lambda c: "x"), "prism": Gated(responder=lambda c: "y")},
        pair=FakePairJudge(),
    )
    res, _ = evaluate(r, parse_systems("base,prism"), Benchmarks(mtbench=items))
    rt = res["mtbench"]["prism"]["routing"]
    assert rt["writing"]["mean"] == 1.0 and rt["coding"]["mean"] == 0.0 and rt["all"]["mean"] == pytest.approx(1 / 3)
    assert rt["writing"]["n"] == 2 and rt["all"]["n"] == len(items)  # each question once (Table 1's rule)
    assert "routing" not in res["mtbench"]["base"]
    md = MTBench().markdown(res, {})
    assert "Routed to the LoRA (MT-Bench, by category; each question once, by its first turn's decision" in "\n".join(
        md
    )


def test_resume_never_regenerates(tmp_path):
    items = load_mtbench(FIX / "mtbench_small.jsonl")
    mm = load_mmlu(FIX / "mmlu_hf.jsonl")
    sets = {"pku": load_safety("pku", FIX / "pku_small.json")}
    bench = Benchmarks(mmlu=mm, mtbench=items, safety=sets)
    personas = load_persona_file(FIX / "personas.json")

    def make():
        eng = ScriptedEngine(responder=lambda c: f"answer {len(c)}", scorer=lambda chat, ch: {c: -1.0 for c in ch})
        judge = ScriptedEngine(responder=lambda c: "[[6]]", scorer=lambda chat, ch: {c: -1.0 for c in ch})
        return eng, judge

    eng, judge = make()
    r1 = _runner(tmp_path, {"base": eng}, judge, FakePairJudge(), personas)
    res1, _ = evaluate(r1, parse_systems("base"), bench)
    assert len(eng.calls) == 12 + 3 and len(eng.score_calls) == 6
    # second run: a new runner on the same dir, plus a new system -> only the new system generates
    eng2, judge2 = make()
    pair2 = FakePairJudge()
    r2 = _runner(tmp_path, {"base": eng2}, judge2, pair2, personas)
    res2, _ = evaluate(r2, parse_systems("base,persona"), bench)
    assert res2["mmlu"]["base"] == res1["mmlu"]["base"]
    base_calls = [c for c, _ in eng2.calls if not any(m["role"] == "system" for m in c)]
    assert base_calls == []  # base answers all came from the cache
    assert len(eng2.calls) == 12 + 3 and len(eng2.score_calls) == 6  # persona only
    # third run: nothing new at all, no engine or judge call
    eng3, judge3 = make()
    pair3 = FakePairJudge()
    r3 = _runner(tmp_path, {"base": eng3}, judge3, pair3, personas)
    res3, _ = evaluate(r3, parse_systems("base,persona"), bench)
    assert eng3.calls == [] and eng3.score_calls == [] and judge3.calls == [] and judge3.score_calls == []
    assert pair3.items == 0 and res3["mtbench"] == res2["mtbench"]
    # a different judge re-judges (cached separately) but never regenerates
    eng4, judge4 = make()
    r4 = EvalRunner(
        tmp_path / "out",
        fixed_provider({"base": eng4}),
        EvalJudge(judge4, "other-judge", pair_judge=FakePairJudge()),
        PersonaBook(personas),
        EvalConfig(answer_tokens=16, safety_tokens=16, resamples=50),
    )
    evaluate(r4, parse_systems("base,persona"), bench)
    assert eng4.calls == [] and len(judge4.calls) > 0


def test_swapped_pairs_cancel_position_bias():
    from prism_persona.judges import Verdict as PairVerdict

    class AlwaysA:
        def compare(self, items):
            return [PairVerdict("A", {}) for _ in items]

    class Unreadable:
        def compare(self, items):
            return [PairVerdict("unparseable", {}) for _ in items]

    j = EvalJudge(ScriptedEngine(), "x", pair_judge=AlwaysA())
    assert [r["outcome"] for r in j.compare_swapped(["q", "q"], ["x1", "x2"], ["y1", "y2"])] == ["tie", "tie"]
    j = EvalJudge(ScriptedEngine(), "x", pair_judge=FakePairJudge())
    assert [r["outcome"] for r in j.compare_swapped(["q", "q"], ["long answer", "s"], ["s", "long answer"])] == [
        "win",
        "loss",
    ]
    r = EvalJudge(ScriptedEngine(), "x", pair_judge=Unreadable()).compare_swapped(["q"], ["a"], ["b"])[0]
    assert r["outcome"] == "tie" and r["unparseable"] is True


def test_logprob_grading_mode():
    import math

    lp = {str(d): (0.0 if d == 7 else -50.0) for d in range(1, 10)}
    j = EvalJudge(ScriptedEngine(scorer=lambda chat, ch: {c: lp[c] for c in ch}), "lp", mode="logprob")
    r = j.grade(["p"])[0]
    assert r["method"] == "logprob" and r["score"] == pytest.approx(7.0)
    half = {str(d): (math.log(0.5) if d in (2, 8) else -60.0) for d in range(1, 10)}
    j = EvalJudge(ScriptedEngine(scorer=lambda chat, ch: {c: half[c] for c in ch}), "lp", mode="logprob")
    assert j.grade(["p"])[0]["score"] == pytest.approx(5.0)
    # auto mode grades from text even when the engine can score
    j = EvalJudge(ScriptedEngine(["[[3]]"], scorer=lambda chat, ch: {c: 0.0 for c in ch}), "a", mode="auto")
    assert j.grade(["p"])[0] == {"score": 3.0, "text": "[[3]]", "method": "text"}


def test_the_default_pairwise_judge_uses_the_judges_token_budget():
    """``judge_tokens`` is the budget of every judge reply, the pairwise text verdict's too (it was
    ignored: the pairwise judge always wrote 24 tokens)."""
    engine = ScriptedEngine(responder=lambda c: "[[A]]")
    judge = EvalJudge(engine, "x", mode="text", max_new_tokens=7)
    judge.compare_swapped(["q"], ["a"], ["b"])
    assert engine.calls and {params.max_new_tokens for _, params in engine.calls} == {7}
