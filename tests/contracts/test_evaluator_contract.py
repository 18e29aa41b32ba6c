"""The contract every benchmark :class:`~prism_persona.evals.base.Evaluator` keeps, on each of them.

:class:`EvaluatorContract` holds the tests; each benchmark's class names its evaluator and its items
(the small fixtures in tests/fixtures). The systems are scripted engines and the judge is scripted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prism_persona.evals.base import AnsweredBenchmark, Evaluator
from prism_persona.evals.benchmarks.mmlu import MMLUEvaluator, load_mmlu
from prism_persona.evals.benchmarks.mtbench import MTBenchEvaluator, load_mtbench
from prism_persona.evals.benchmarks.safety import SafetyEvaluator, load_safety
from prism_persona.evals.evaluate import systems_to_run
from prism_persona.evals.runner import EvalRunner
from prism_persona.evals.settings import EvalConfig
from prism_persona.evals.systems import PersonaBook, fixed_provider, parse_systems
from prism_persona.judges import CallableJudge, EvalJudge
from prism_persona.testing import ScriptedEngine

FIX = Path(__file__).resolve().parents[1] / "fixtures"
SYSTEMS = "base,prism,oracle"


class GatedScripted(ScriptedEngine):
    """A scripted gated system: routes chats that mention a digit, with a fixed gate probability."""

    @staticmethod
    def decision(chat) -> tuple[float, bool]:
        routed = any(ch.isdigit() for ch in chat[0]["content"])
        return (0.75 if routed else 0.25), routed

    def route(self, chats):
        return [self.decision(c) for c in chats]

    def generate(self, chats, params, desc=""):
        outs = super().generate(chats, params)
        for chat, out in zip(chats, outs):
            prob, routed = self.decision(chat)
            out.meta = {"routed": routed, "gate_prob": prob}
        return outs


def scores(chat, choices) -> dict:
    return {c: -1.0 - i for i, c in enumerate(choices)}


def systems() -> dict:
    return {
        "base": ScriptedEngine(responder=lambda chat: "Sure, here it is: a short answer.", scorer=scores),
        "lora": ScriptedEngine(responder=lambda chat: "I'm sorry, I can't help with that.", scorer=scores),
        "prism": GatedScripted(responder=lambda chat: f"A routed answer of {len(chat)} turns.", scorer=scores),
    }


def judge_reply(chat) -> str:
    return "[[6]]" if "Assistant" in chat[-1]["content"] else "no"


def runner_for(out: Path, engines: dict, judge_engine: ScriptedEngine) -> EvalRunner:
    pair = CallableJudge(lambda query, answer_a, answer_b: "A" if len(answer_a) > len(answer_b) else "B")
    return EvalRunner(
        out,
        fixed_provider(engines),
        EvalJudge(judge_engine, "contract", pair_judge=pair),
        PersonaBook({}),
        EvalConfig(answer_tokens=8, safety_tokens=8, resamples=50),
    )


@dataclass(frozen=True)
class SumItem:
    item_id: str
    a: int
    b: int


class EvaluatorContract:
    """What every benchmark promises. Subclasses implement :meth:`make`, :meth:`items` and :meth:`item_ids`."""

    def make(self) -> Evaluator:
        raise NotImplementedError

    def items(self):
        raise NotImplementedError

    def item_ids(self, items) -> set:
        return {it.item_id for it in items}

    def run(self, out: Path, engines: dict, judge_engine: ScriptedEngine):
        specs = parse_systems(SYSTEMS)
        runner = runner_for(out, engines, judge_engine)
        return self.make().evaluate(runner, systems_to_run(specs), specs, self.items())

    def test_has_a_name(self):
        assert isinstance(self.make(), Evaluator) and self.make().name

    def test_every_reported_system_gets_a_summary_and_a_value_per_item(self, tmp_path):
        summary, per_item, _ = self.run(tmp_path, systems(), ScriptedEngine(responder=judge_reply))
        names = [s.name for s in parse_systems(SYSTEMS)]
        assert sorted(summary) == sorted(per_item) == sorted(names)
        ids = self.item_ids(self.items())
        for name in names:
            assert set(per_item[name]) == ids, name
            assert all(isinstance(v, float) for v in per_item[name].values()), name

    def test_a_second_run_answers_from_the_cache(self, tmp_path):
        first = self.run(tmp_path, systems(), ScriptedEngine(responder=judge_reply))
        silent = {name: ScriptedEngine() for name in systems()}  # raises on any generation
        assert self.run(tmp_path, silent, ScriptedEngine()) == first

    def test_gates_hold_the_gated_system_decisions_only(self, tmp_path):
        _, _, gates = self.run(tmp_path, systems(), ScriptedEngine(responder=judge_reply))
        assert list(gates) == ["prism"] and gates["prism"]
        ids = self.item_ids(self.items())
        for records in gates["prism"].values():
            assert records and set(records) <= ids
            # each item's record is the decision the gated engine reported: probability and route
            pairs = {(r["gate_prob"], r["routed"]) for r in records.values()}
            assert pairs <= {(0.25, False), (0.75, True)}


class TestMMLU(EvaluatorContract):
    def make(self):
        return MMLUEvaluator()

    def items(self):
        return load_mmlu(FIX / "mmlu_hf.jsonl")


class TestMTBench(EvaluatorContract):
    def make(self):
        return MTBenchEvaluator()

    def items(self):
        return load_mtbench(FIX / "mtbench_small.jsonl")


class TestSafety(EvaluatorContract):
    def make(self):
        return SafetyEvaluator()

    def items(self):
        return {
            "harmbench": load_safety("harmbench", FIX / "harmbench_small.csv"),
            "pku": load_safety("pku", FIX / "pku_small.json"),
        }

    def item_ids(self, items) -> set:
        return {it.item_id for group in items.values() for it in group}


class TestRefusalSet(TestSafety):
    """A labelled refusal set (harmful and benign members of one file) on the safety evaluator."""

    def make(self):
        from prism_persona.evals.benchmarks import REGISTRY

        return REGISTRY["refusal_set"].evaluator(pairwise=False)

    def items(self):
        from prism_persona.evals.benchmarks import REGISTRY
        from prism_persona.evals.settings import EvalConfig

        bench = REGISTRY["refusal_set"]
        return bench.load(EvalConfig(refusal_set=str(FIX / "refusal_set_small.jsonl")), bench.members, None)


class Sums(AnsweredBenchmark):
    """An unregistered one-question benchmark: right when the answer holds the sum."""

    name = "sums"

    def load(self, cfg, names, limit):
        return [SumItem(f"sums/{a}", a, 1) for a in range(4)]

    def prompt(self, item):
        return f"What is {item.a} + {item.b}?" if item.a % 2 else "What is the sum of one and one?"

    def grade(self, item, answer):
        return float(str(item.a + item.b) in answer)


class TestGradedAnswers(EvaluatorContract):
    """The evaluator every :class:`AnsweredBenchmark` gets (its own prompt and grading)."""

    def make(self):
        return Sums().evaluator(pairwise=False)

    def items(self):
        return Sums().load(EvalConfig(), ["sums"], None)


def test_every_evaluator_has_a_contract_class():
    tested = {type(cls().make()) for cls in EvaluatorContract.__subclasses__()}
    shipped = {c for c in Evaluator.__subclasses__() if c.__module__.startswith("prism_persona.")}
    assert shipped <= tested and len(tested) == 4  # (a test may register its own toy benchmark)
