"""Judges: text parsing, position swapping, log-prob verdicts, user callables, make_judge."""

from __future__ import annotations

import logging

import pytest

from prism_persona import config as C
from prism_persona.errors import PrismError
from prism_persona.judges import (
    CallableJudge,
    ModelJudge,
    PairItem,
    judge_swapped,
    judge_swapped_batch,
    load_callable,
    make_judge,
    parse_verdict,
)
from prism_persona.testing import ScriptedEngine


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A", "A"),
        ("B.", "B"),
        ("(A)", "A"),
        ("**B**", "B"),
        ("  a", "A"),
        ("[[A]]", "A"),
        ("My final verdict is [[B]]", "B"),
        ("[[C]]", "tie"),
        ("[[tie]]", "tie"),
        ("Answer: B", "B"),
        ("Answer A", "A"),
        ("Response A is better because it is specific.", "A"),
        ("I prefer B", "B"),
        ("Both responses are good, but B is clearly better.", "B"),
        ("The better response is A.", "A"),
        ("A is the better response", "A"),
        ("B, because it is concrete.", "B"),
        ("Response B is better than Response A.", "B"),
        ('The answer is "A"', "A"),
        ('The correct response is "B".', "B"),
        ("The answer is a matter of taste.", "unparseable"),
        ("A literal take on the story is a great way to start.", "unparseable"),
        ("Response A is more helpful.", "A"),
        ("I would choose Response B.", "B"),
        ("B is better", "B"),
        ("tie", "tie"),
        ("It's a tie.", "tie"),
        ("A tie", "tie"),
        ("Both are equally good.", "tie"),
        ("", "unparseable"),
        ("   ", "unparseable"),
        ("A good answer should be clear.", "unparseable"),
        ("Response A says x, while Response B says y.", "unparseable"),
        ("I cannot decide", "unparseable"),
    ],
)
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


def _judge_prompt_parts(chat):
    text = chat[-1]["content"]
    a = text.split("[Response A]")[1].split("[Response B]")[0].strip()
    b = text.split("[Response B]")[1].split("\n\n")[0].strip()
    return a, b


def test_swapped_orders_show_each_answer_in_both_positions():
    seen = []

    def responder(chat):
        a, b = _judge_prompt_parts(chat)
        seen.append((a, b))
        return "A" if a == "X-answer" else "B"  # a position-consistent judge that prefers X

    eng = ScriptedEngine(responder=responder)
    res = judge_swapped(ModelJudge(eng, mode="text"), "q?", "X-answer", "Y-answer")
    assert seen == [("X-answer", "Y-answer"), ("Y-answer", "X-answer")]
    assert res.outcomes == ("x", "x") and res.winner == "x" and res.x_wins
    assert res.first.winner == "A" and res.second.winner == "B"
    # the judge replies greedily with the configured budget and sees no persona/system message
    assert all(p.temperature == 0.0 for _, p in eng.calls)
    assert all(c[0]["role"] == "user" and len(c) == 1 for c, _ in eng.calls)


@pytest.mark.parametrize(
    "replies, winner",
    [
        (["A", "A"], "mixed"),  # always the first position: never a win
        (["B", "B"], "mixed"),
        (["B", "A"], "y"),
        (["tie", "tie"], "tie"),
        (["A", "tie"], "mixed"),
        (["A", "no idea"], "unparseable"),
    ],
)
def test_combining_orders(replies, winner):
    res = judge_swapped(ModelJudge(ScriptedEngine(replies), mode="text"), "q", "x", "y")
    assert res.winner == winner
    assert res.x_wins is False


def test_logprob_verdicts_and_tie_margin():
    def scorer(chat, choices):
        a, _ = _judge_prompt_parts(chat)
        assert choices == ["A", "B"]
        return {"A": -0.5, "B": -0.6} if a == "x" else {"A": -0.6, "B": -0.5}

    eng = ScriptedEngine(scorer=scorer)
    judge = ModelJudge(eng, mode="auto")
    assert judge.mode == "logprob"
    res = judge_swapped(judge, "q", "x", "y")
    assert res.winner == "x" and res.first.detail == {"logp_A": -0.5, "logp_B": -0.6}
    assert eng.calls == []  # nothing generated in logprob mode
    assert "single letter" in eng.score_calls[0][0][0]["content"]
    tied = judge_swapped(ModelJudge(ScriptedEngine(scorer=scorer), mode="logprob", tie_margin=0.2), "q", "x", "y")
    assert tied.winner == "tie" and tied.first.winner == "tie"


def test_mode_selection_and_logprob_without_scores():
    plain = ScriptedEngine(["B", "A"])
    assert ModelJudge(plain, mode="auto").mode == "text"
    with pytest.raises(PrismError, match="log-probabilities"):
        ModelJudge(plain, mode="logprob")
    scoring = ScriptedEngine(["B", "A"], scorer=lambda c, ch: {})
    assert ModelJudge(scoring, mode="text").mode == "text"


def test_logprob_engine_returning_none_falls_back_to_text(caplog):
    class NoScores(ScriptedEngine):
        def score_choices(self, chats, choices):
            return None

        @property
        def can_score(self):
            return True

    judge = ModelJudge(NoScores(["A", "B"]), mode="auto")
    res = judge_swapped(judge, "q", "x", "y")
    assert res.winner == "x" and judge.mode == "text" and "no log-probabilities" in caplog.text


def test_callable_judge_results_and_errors(caplog):
    calls = []

    def fn(query, a, b):
        calls.append((query, a, b))
        if a == "boom":
            raise ValueError("bad input")
        return {"winner": "a"} if a == "x" else "B" if b == "x" else None

    judge = CallableJudge(fn, name="t:fn")
    res = judge_swapped_batch(judge, [("q", "x", "y"), ("q2", "boom", "y")])
    assert calls[:2] == [("q", "x", "y"), ("q", "y", "x")]
    assert res[0].winner == "x"
    assert res[1].first.winner == "unparseable" and "bad input" in res[1].first.detail["error"]
    assert res[1].winner == "unparseable" and judge.errors == 1
    assert "raised ValueError" in caplog.text
    assert "t:fn returned None, not A, B or tie (counted as unparseable" in caplog.text  # named (issue 20)
    with caplog.at_level(logging.WARNING):
        assert (
            CallableJudge(lambda q, a, b: 42, name="broken").compare([PairItem("q", "a", "b")])[0].winner
            == "unparseable"
        )
    assert "judge broken returned 42, not A, B or tie" in caplog.text


def test_load_callable(tmp_path, monkeypatch):
    (tmp_path / "my_judge_mod.py").write_text("def pick(q, a, b):\n    return 'tie'\nnot_fn = 3\n")
    (tmp_path / "broken_judge_mod.py").write_text("import no_such_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_callable("my_judge_mod:pick")("q", "a", "b") == "tie"
    assert load_callable(f"{tmp_path}/my_judge_mod.py:pick")("q", "a", "b") == "tie"
    with pytest.raises(PrismError, match="cannot import judge module 'no_such_mod_abc'"):
        load_callable("no_such_mod_abc:f")
    with pytest.raises(PrismError, match="no_such_module_xyz"):
        load_callable("broken_judge_mod:f")
    with pytest.raises(PrismError, match="has no attribute 'missing'"):
        load_callable("my_judge_mod:missing")
    with pytest.raises(PrismError, match="not callable"):
        load_callable("my_judge_mod:not_fn")
    with pytest.raises(PrismError, match="judge file not found"):
        load_callable(f"{tmp_path}/nope.py:pick")


def test_make_judge(tmp_path, monkeypatch):
    (tmp_path / "judge_mod2.py").write_text("def pick(q, a, b):\n    return 'A'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    eng = ScriptedEngine()
    cfg = C.resolve(overrides={"persona": {"domains": ["a"]}})
    j = make_judge(cfg, eng)
    assert isinstance(j, ModelJudge) and j.engine is eng and j.mode == "text" and j.engines == []
    cfg.judge.judge = "judge_mod2:pick"
    j = make_judge(cfg, eng)
    assert isinstance(j, CallableJudge) and j.compare([PairItem("q", "a", "b")])[0].winner == "A"
    cfg.judge.judge = str(tmp_path / "missing-model-dir")
    with pytest.raises(PrismError, match="not found"):
        make_judge(cfg, eng)


def test_other_model_judge_loads_second_engine(tiny_model_dir):
    cfg = C.resolve(
        overrides={
            "persona": {"domains": ["a"]},
            "judge": {"judge": str(tiny_model_dir)},
            "model": {"dtype": "float32", "device": "cpu"},
        }
    )
    j = make_judge(cfg, ScriptedEngine())
    assert isinstance(j, ModelJudge) and j.mode == "logprob" and j.engines == [j.engine]
    res = judge_swapped(j, "What is 2+2?", "4", "five")
    assert res.first.winner in ("A", "B", "tie") and set(res.first.detail) == {"logp_A", "logp_B"}


def test_callable_judge_receives_domain_and_persona_when_it_asks_for_them():
    seen = []

    def three(query, a, b):
        seen.append(("three", query))
        return "A"

    def with_domain(query, a, b, domain):
        seen.append(("domain", domain))
        return "A" if domain == "writing" else "B"

    def with_kwargs(query, a, b, **context):
        seen.append(("kwargs", context))
        return "tie"

    for fn in (three, with_domain, with_kwargs):
        r = judge_swapped(CallableJudge(fn), "q?", "x", "y", domain="writing", persona="You are a poet.")
        assert r.first.winner in ("A", "tie")
    assert ("three", "q?") in seen
    assert seen.count(("domain", "writing")) == 2  # both orders got the domain
    assert {"domain": "writing", "persona": "You are a poet."} in [s[1] for s in seen if s[0] == "kwargs"]
    # the old three-tuple form still works and gives empty context
    assert judge_swapped_batch(CallableJudge(with_domain), [("q", "x", "y")])[0].first.winner == "B"


def test_bootstrap_passes_each_pairs_domain_and_persona_to_the_judge(tmp_path):
    from prism_persona.testing import BootstrapEngine, bootstrap_config
    from prism_persona.train.pipeline import run_bootstrap

    calls = []

    def judge(query, a, b, domain, persona):
        calls.append((domain, persona))
        return "A" if "EXPERT" in a else "B"

    cfg = bootstrap_config(tmp_path / "run", queries={"queries_per_persona": 3, "per_request": 4})
    run_bootstrap(cfg, engine=BootstrapEngine(), judge=CallableJudge(judge))
    assert {d for d, _ in calls} == {"writing", "coding"}
    assert all(p.startswith("You are") and d in p for d, p in calls)  # the domain's own persona text


def test_unimportable_judge_module_names_the_file_form():
    with pytest.raises(PrismError, match=r"--judge path/to/my_judge\.py:prefer") as info:
        load_callable("examples.my_judge:prefer")
    assert "\n" not in str(info.value)
