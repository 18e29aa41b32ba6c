"""The contract every pairwise :class:`~prism_persona.judges.Judge` keeps, checked on each implementation.

:class:`JudgeContract` holds the tests; each implementation's class builds two judges: one that
prefers the answer containing ``GOOD``, one whose verdicts cannot be read.
"""

from __future__ import annotations

from prism_persona.judges import (
    CallableJudge,
    Judge,
    ModelJudge,
    PairItem,
    Verdict,
    judge_swapped,
    judge_swapped_batch,
)
from prism_persona.testing import ScriptedEngine

WINNERS = {"A", "B", "tie", "unparseable"}
ITEMS = [
    PairItem("q1", "GOOD one", "BAD one"),
    PairItem("q2", "BAD two", "GOOD two"),
    PairItem("q3", "GOOD three", "BAD three"),
]


def shown_first_is_good(prompt: str) -> bool:
    """In a judge prompt, answer A is shown before answer B."""
    return prompt.index("GOOD") < prompt.index("BAD")


class JudgeContract:
    """What every judge promises. Subclasses implement :meth:`make_judge` and :meth:`make_unreadable`."""

    def make_judge(self) -> Judge:
        """A judge that prefers the answer containing ``GOOD``."""
        raise NotImplementedError

    def make_unreadable(self) -> Judge:
        """A judge whose verdicts cannot be read (garbled replies, no log-probability mass, errors)."""
        raise NotImplementedError

    def test_one_verdict_per_item_in_order(self):
        verdicts = self.make_judge().compare(ITEMS)
        assert all(isinstance(v, Verdict) and isinstance(v.detail, dict) for v in verdicts)
        assert [v.winner for v in verdicts] == ["A", "B", "A"]
        assert self.make_judge().compare([]) == []

    def test_both_orders_decide_a_win(self):
        judge = self.make_judge()
        good = judge_swapped(judge, "q", "GOOD answer", "BAD answer")
        assert good.outcomes == ("x", "x") and good.winner == "x" and good.x_wins
        bad = judge_swapped(judge, "q", "BAD answer", "GOOD answer")
        assert bad.outcomes == ("y", "y") and bad.winner == "y" and not bad.x_wins
        batch = judge_swapped_batch(judge, [("q", "GOOD a", "BAD b", "", ""), ("q", "BAD c", "GOOD d", "", "")])
        assert [r.winner for r in batch] == ["x", "y"]

    def test_an_unreadable_verdict_is_unparseable_never_an_error_nor_a_win(self):
        judge = self.make_unreadable()
        verdicts = judge.compare(ITEMS)
        assert [v.winner for v in verdicts] == ["unparseable"] * len(ITEMS)
        result = judge_swapped(judge, "q", "GOOD answer", "BAD answer")
        assert result.winner == "unparseable" and not result.x_wins

    def test_verdicts_are_known_words_and_close_is_harmless(self):
        judge = self.make_judge()
        assert {v.winner for v in judge.compare(ITEMS)} <= WINNERS
        assert isinstance(judge.name, str) and judge.name and isinstance(judge.mode, str)
        judge.close()
        judge.close()


def text_reply(chat) -> str:
    return "A" if shown_first_is_good(chat[-1]["content"]) else "Response B is better."


def logprob_scores(chat, choices) -> dict:
    a_good = shown_first_is_good(chat[-1]["content"])
    return {"A": -0.2 if a_good else -2.5, "B": -2.5 if a_good else -0.2}


class TestModelJudgeText(JudgeContract):
    def make_judge(self):
        judge = ModelJudge(ScriptedEngine(responder=text_reply), mode="auto")
        assert judge.mode == "text"  # the engine cannot score
        return judge

    def make_unreadable(self):
        return ModelJudge(ScriptedEngine(responder=lambda chat: "Both answers have merits."), mode="text")


class TestModelJudgeLogprob(JudgeContract):
    def make_judge(self):
        judge = ModelJudge(ScriptedEngine(scorer=logprob_scores), mode="auto")
        assert judge.mode == "logprob"
        return judge

    def make_unreadable(self):
        no_mass = ScriptedEngine(scorer=lambda chat, choices: {c: float("-inf") for c in choices})
        return ModelJudge(no_mass, mode="logprob")


def prefers_good(query, answer_a, answer_b):
    return "A" if "GOOD" in answer_a else {"winner": "b"}


class TestCallableJudge(JudgeContract):
    def make_judge(self):
        return CallableJudge(prefers_good)

    def make_unreadable(self):
        return CallableJudge(lambda query, answer_a, answer_b: None)


class TestCallableJudgeThatRaises(TestCallableJudge):
    def make_unreadable(self):
        def broken(query, answer_a, answer_b):
            raise ValueError("the user's judge broke")

        return CallableJudge(broken)

    def test_the_error_is_kept_as_evidence(self):
        judge = self.make_unreadable()
        verdict = judge.compare(ITEMS[:1])[0]
        assert verdict.detail == {"error": "ValueError: the user's judge broke"} and judge.errors == 1
