"""Adding a pairwise judge is one module plus one name (src/prism_persona/judges/__init__.py: a plug-in is a
function ``judge(query, answer_a, answer_b[, domain=, persona=]) -> "A" | "B" | "tie"`` named
``module:function``).

The module below, written into a temporary package, is the whole toy judge; ``judge.judge =
"toy_judges.toy:prefers_good"`` (``--judge`` on a command line) is its one registration line. It keeps the
contract every judge keeps (the mixins of tests/contracts/test_judge_contract.py) and judges the bootstrap's
verdicts step.
"""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest

TOY = '''
def prefers_good(query, answer_a, answer_b, domain="", persona=""):
    """The answer that says GOOD wins; a tie when both or neither do; None (unreadable) for an empty query."""
    if not query:
        return None
    a, b = "GOOD" in answer_a, "GOOD" in answer_b
    return "tie" if a == b else ("A" if a else "B")
'''
SPEC = "toy_judges.toy:prefers_good"


def _contract_module():
    """tests/contracts/test_judge_contract.py (its mixins; the tests folders are not packages)."""
    path = Path(__file__).resolve().parents[1] / "contracts" / "test_judge_contract.py"
    spec = importlib.util.spec_from_file_location("judge_contract_for_extension", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


contract = _contract_module()


@pytest.fixture(autouse=True)
def toy_judge_module(tmp_path, monkeypatch):
    (tmp_path / "toy_judges").mkdir()
    (tmp_path / "toy_judges" / "__init__.py").write_text("")
    (tmp_path / "toy_judges" / "toy.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in ("toy_judges.toy", "toy_judges"):
        sys.modules.pop(name, None)


class TestToyJudge(contract.JudgeContract):
    """The toy judge, loaded by name the way ``--judge`` loads it, keeps every judge's contract."""

    def make_judge(self):
        from prism_persona.judges import CallableJudge, judge_from_spec

        judge = judge_from_spec(SPEC, None)
        assert isinstance(judge, CallableJudge) and judge.name == SPEC
        return judge

    def make_unreadable(self):
        from prism_persona.judges import judge_from_spec

        judge = judge_from_spec(SPEC, None)
        raw = judge.compare
        judge.compare = lambda items: raw([type(i)("", i.answer_a, i.answer_b) for i in items])  # no query
        return judge


def test_the_toy_judge_judges_the_verdicts_step(tmp_path):
    """``judge.judge = module:function`` in a run config: the verdicts step records its decisions."""
    from prism_persona import config as C
    from prism_persona.bootstrap.verify import verdicts_store, write_verdicts
    from prism_persona.judges import check_judge_spec, make_judge
    from prism_persona.store import RunDir

    cfg = C.resolve("tiny", overrides={"persona": {"domains": ["w"]}, "quiet": True, "judge": {"judge": SPEC}})
    check_judge_spec(cfg.judge.judge)  # what a run does before the model loads
    answers = [
        {"key": "k0", "domain": "w", "query": "q0", "persona_answer": "GOOD p", "base_answer": "b"},
        {"key": "k1", "domain": "w", "query": "q1", "persona_answer": "p", "base_answer": "GOOD b"},
        {"key": "k2", "domain": "w", "query": "q2", "persona_answer": "p", "base_answer": "b"},
    ]
    run = RunDir(tmp_path / "run")
    assert write_verdicts(cfg, run, lambda: make_judge(cfg, None), answers, personas={}) == 3
    store = verdicts_store(run, cfg)
    records = [store.get(a["key"]) for a in answers]
    assert [r["winner"] for r in records] == ["persona", "base", "tie"]  # x = the persona answer, both orders
    assert [r["label"] for r in records] == [1, 0, 0] and {r["judge"] for r in records} == {SPEC}
    assert [v["winner"] for v in records[0]["verdicts"]] == ["A", "B"]  # asked in both orders


def test_an_installed_packages_judge_is_named_by_its_entry_point(tmp_path):
    """From an installed package the one line is its ``prism_persona.judges`` entry point: ``--judge good``
    (or ``judge.judge = "good"``) then names the package's function, the same contract as ``module:function``."""
    from prism_persona.errors import PrismError
    from prism_persona.judges import CallableJudge, PairItem, check_judge_spec, judge_from_spec
    from prism_persona.judges.pairwise import installed_judge

    meta = tmp_path / "toy_judges-0.1.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-judges\nVersion: 0.1\n", encoding="utf-8")
    assert installed_judge("good") is None  # not installed yet: 'good' would be a model id
    (meta / "entry_points.txt").write_text(f"[prism_persona.judges]\ngood = {SPEC}\nbroken = toy_judges.none:f\n")
    check_judge_spec("good")
    judge = judge_from_spec("good", None)
    assert isinstance(judge, CallableJudge) and judge.name == "good"
    verdicts = judge.compare([PairItem("q", "GOOD a", "b"), PairItem("q", "a", "GOOD b"), PairItem("q", "a", "b")])
    assert [v.winner for v in verdicts] == ["A", "B", "tie"]
    with pytest.raises(PrismError, match=r"^judge entry point 'broken = toy_judges.none:f' \(package toy-judges\)"):
        check_judge_spec("broken")
