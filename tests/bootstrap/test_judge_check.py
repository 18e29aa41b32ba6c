"""The blind-judge rule, its early warning after the first verification batch, the judge's margin
and the data report (scripted engines and judges, no model)."""

import logging

from prism_persona.bootstrap.summary import (
    BLIND_MIN_PAIRS,
    data_report,
    format_data_report,
    judge_blindness,
    judge_diagnostics,
)
from prism_persona.bootstrap.verify import persona_margin
from prism_persona.testing import blind_verdicts, seeing_verdicts, verdict_stub


def test_a_judge_that_always_picks_a_is_blind_and_says_why():
    diag = judge_diagnostics(blind_verdicts(12))
    assert diag["position_a_rate"] == 1.0 and diag["flip_rate"] == 1.0 and diag["order_agreement"] == 0.0
    assert "position A in 100%" in diag["blind"]


def test_a_consistent_judge_is_not_blind_nor_one_with_too_few_pairs():
    assert judge_diagnostics(seeing_verdicts(12))["blind"] is None
    assert judge_diagnostics(blind_verdicts(BLIND_MIN_PAIRS - 1))["blind"] is None


def test_flips_without_a_position_bias_and_all_ties_are_blind_too():
    flips = [verdict_stub("w", "A", "A", "mixed"), verdict_stub("w", "B", "B", "mixed")] * 4
    assert "order of the answers on 100%" in judge_diagnostics(flips)["blind"]
    ties = [verdict_stub("w", "tie", "tie", "tie")] * 8
    assert "no verdict" in judge_blindness(judge_diagnostics(ties))


def test_data_report_says_labels_are_noise_for_a_blind_judge():
    stats = {"writing": {"written": 20, "usable": 12, "dropped": {"meta-text": 8}}}
    rep = data_report(["writing"], blind_verdicts(12), stats, 12)
    row = rep["domains"]["writing"]
    assert (row["requested"], row["written"], row["usable"], row["wins"], row["ties"]) == (12, 20, 12, 0, 12)
    assert row["enough_positives"] is False and rep["enough_for_gate"] is False
    text = "\n".join(format_data_report(rep))
    assert "labels are noise" in text and "meta-text 8" in text


def test_data_report_counts_positives_per_domain_with_the_documented_rule():
    recs = seeing_verdicts(12, "stories") + [verdict_stub("cooking", "B", "A", "base") for _ in range(12)]
    rep = data_report(["stories", "cooking"], recs, {}, 12)
    assert rep["domains"]["stories"]["wins"] == 6 and rep["domains"]["stories"]["enough_positives"]
    assert not rep["domains"]["cooking"]["enough_positives"]
    assert rep["enough_for_gate"] and rep["domains"]["stories"]["order_agreement"] == 1.0


def test_persona_margin_averages_both_orders_so_a_position_bias_cancels():
    # the judge prefers A by 2 nats whatever stands there: no preference for the persona
    assert persona_margin(verdict_stub("w", "A", "A", "mixed", [(-1.0, -3.0), (-1.0, -3.0)])["verdicts"]) == 0.0
    # persona shown as A: +3; persona shown as B: +1 -> mean +2
    assert persona_margin(verdict_stub("w", "A", "B", "persona", [(-1.0, -4.0), (-2.0, -1.0)])["verdicts"]) == 2.0
    assert persona_margin(verdict_stub("w", "A", "B", "persona")["verdicts"]) is None  # a text or rule judge


def test_blind_warning_comes_after_the_first_verification_batch(tmp_path):
    from prism_persona import config as C
    from prism_persona.bootstrap.verify import write_verdicts
    from prism_persona.judges import ModelJudge
    from prism_persona.store import RunDir
    from prism_persona.testing import ScriptedEngine

    cfg = C.resolve("tiny", overrides={"persona": {"domains": ["writing"]}, "quiet": True, "model": {"batch_size": 8}})
    answers = [
        {"key": f"k{i}", "domain": "writing", "query": f"q{i}", "persona_answer": "p", "base_answer": "b"}
        for i in range(12)
    ]
    engine = ScriptedEngine(scorer=lambda chat, choices: {"A": -0.1, "B": -3.0})  # always "A"
    judge = ModelJudge(engine)
    batches = []
    orig = judge.compare
    judge.compare = lambda items: batches.append(len(items)) or orig(items)
    warnings = []

    class Seen(logging.Handler):
        def emit(self, rec):
            if "cannot tell the answers apart" in rec.getMessage():
                warnings.append((len(batches), rec.getMessage()))

    handler = Seen(level=logging.WARNING)
    logging.getLogger("prism_persona").addHandler(handler)
    try:
        write_verdicts(cfg, RunDir(tmp_path), lambda: judge, answers, personas={})
    finally:
        logging.getLogger("prism_persona").removeHandler(handler)
    assert batches == [8, 8, 8]  # three batches of 4 pairs, both orders
    assert len(warnings) == 1 and warnings[0][0] == 1  # once, right after the first batch
    assert "labels are noise" in warnings[0][1] and "--judge" in warnings[0][1]
