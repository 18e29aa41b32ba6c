"""The debiased verdict rule (judge.rule=margin, calibrated abstain band) and several answer samples
per query (answers.samples): scripted engines whose log-probabilities and answers the tests control."""

from __future__ import annotations

import json
import re

import pytest

from prism_persona import config as C
from prism_persona.bootstrap.summary import blind_warning, debiased_note, judge_diagnostics
from prism_persona.bootstrap.verify import margin_winner
from prism_persona.options import merge
from prism_persona.stats import _quantile
from prism_persona.store import RunDir
from prism_persona.testing import BootstrapEngine
from prism_persona.train.distill import per_sample
from prism_persona.train.gate import gate_targets
from prism_persona.train.pipeline import load_labelled, run_bootstrap


def make_cfg(tmp_path, name="run", **over):
    base = {
        "out": str(tmp_path / name),
        "quiet": True,
        "persona": {"domains": ["writing", "coding"]},
        "queries": {"queries_per_persona": 5, "per_request": 4},
        "model": {"batch_size": 4},
    }
    return C.resolve("tiny", overrides=merge(base, over))


def read_jsonl(path):
    return [json.loads(x) for x in open(path, encoding="utf-8") if x.strip()]


def shown(chat):
    text = chat[-1]["content"]
    a = text.split("[Response A]")[1].split("[Response B]")[0]
    b = text.split("[Response B]")[1].split("Which response")[0]
    return a, b


def query_of(chat):
    return chat[-1]["content"].split("[Query]")[1].split("[Response A]")[0].strip()


def scored_engine(pref, bias=2.0):
    """A log-prob judge: log P(A) - log P(B) = bias + pref(query, A) - pref(query, B) (a position prior
    ``bias`` plus a real preference ``pref``)."""
    eng = BootstrapEngine()

    def scorer(chat, choices):
        a, b = shown(chat)
        q = query_of(chat)
        d = bias + pref(q, a) - pref(q, b)
        return {"A": -1.0 + d / 2, "B": -1.0 - d / 2}

    eng.scorer = scorer
    return eng


# --------------------------------------------------------------------------------------------------
# the margin rule


def test_margin_winner_band():
    assert [margin_winner(m, 0.5) for m in (0.6, 0.5, 0.0, -0.5, -0.7)] == ["persona", "tie", "tie", "tie", "base"]
    assert margin_winner(None, 0.0) == "unparseable"


@pytest.mark.parametrize("rule", ["both_orders", "margin"])
def test_a_judge_that_only_prefers_position_a_gives_no_wins(tmp_path, rule):
    cfg = make_cfg(tmp_path, judge={"rule": rule, "null_pairs": 4})
    s = run_bootstrap(cfg, engine=scored_engine(lambda q, ans: 0.0, bias=3.0))
    assert s["total"]["wins"] == 0 and s["total"]["losses"] == 0
    recs = read_jsonl(RunDir(cfg.out).path("verdicts.jsonl"))
    assert {r["rule"] for r in recs} == {rule}
    assert all(v["winner"] == "A" for r in recs for v in r["verdicts"])  # the raw letters are all A
    assert all(r["label"] == 0 for r in load_labelled(cfg.out))


def test_margin_recovers_a_real_preference_under_a_position_bias(tmp_path):
    # the persona answer is better on some queries (even length) and worse on the others, by 0.5 nat;
    # the judge adds a position prior of 2 nats, so every raw verdict is "A" and the paper's rule finds
    # nothing
    def better(q):
        return len(q) % 2 == 0

    def pref(q, ans):
        return (0.5 if better(q) else -0.5) if "EXPERT" in ans else 0.0

    both = make_cfg(tmp_path, name="both")
    s_both = run_bootstrap(both, engine=scored_engine(pref))
    assert s_both["total"]["wins"] == 0 and s_both["judge_diagnostics"]["blind"]

    cfg = make_cfg(tmp_path, judge={"rule": "margin", "null_pairs": 4})
    s = run_bootstrap(cfg, engine=scored_engine(pref))
    recs = read_jsonl(RunDir(cfg.out).path("verdicts.jsonl"))
    for r in recs:
        assert r["rule"] == "margin" and r["band"] == 0.0  # null pairs: identical answers, margin 0
        assert r["winner"] == ("persona" if better(r["query"]) else "base") and abs(r["margin"]) == 0.5
    n_better = sum(better(r["query"]) for r in recs)
    assert 0 < n_better < len(recs)
    assert s["total"]["wins"] == n_better and s["total"]["losses"] == len(recs) - n_better
    # the margin rule cancels the position prior: the judge is not reported blind
    assert s["judge_diagnostics"]["blind"] is None and s["judge_diagnostics"]["rule"] == "margin"
    nulls = read_jsonl(RunDir(cfg.out).path("null_pairs.jsonl"))
    assert len(nulls) == 4 and all(n["margin"] == 0.0 for n in nulls)
    assert [r["label"] for r in load_labelled(cfg.out)] == [int(better(r["query"])) for r in recs]


class VariedEngine(BootstrapEngine):
    """Answers carry a tag drawn from the sampling seed (``#0``..``#3``) and a seed-long padding, so
    two samples of one system differ."""

    def reply(self, chat, params):
        out = super().reply(chat, params)
        if out.startswith(("EXPERT answer", "plain answer")):
            return out + f" #{params.seed % 4}" + "x" * (params.seed % 7)
        return out


def test_band_is_calibrated_on_null_pairs_and_decides_the_verdicts(tmp_path):
    eng = VariedEngine()

    def scorer(chat, choices):
        a, b = shown(chat)
        d = 1.5 + 0.1 * (len(a) - len(b)) + (0.3 if "EXPERT" in a else 0) - (0.3 if "EXPERT" in b else 0)
        return {"A": -d / 2, "B": d / 2}

    eng.scorer = scorer
    cfg = make_cfg(tmp_path, judge={"rule": "margin", "null_pairs": 6, "null_quantile": 0.8})
    run_bootstrap(cfg, engine=eng)
    run = RunDir(cfg.out)
    nulls = read_jsonl(run.path("null_pairs.jsonl"))
    assert len(nulls) == 6 and len({n["key"] for n in nulls}) == 6
    band = _quantile(sorted(abs(n["margin"]) for n in nulls), 0.8)
    assert band > 0  # the two base samples differ, and the judge sees their length difference
    recs = read_jsonl(run.path("verdicts.jsonl"))
    for r in recs:
        assert r["band"] == pytest.approx(band, abs=1e-4)
        assert r["winner"] == margin_winner(r["margin"], r["band"])
    # a resumed run reuses the null pairs and the verdicts
    n_calls = eng.n_generate
    again = VariedEngine(fail_after=0)
    again.scorer = scorer
    run_bootstrap(cfg, engine=again)
    assert read_jsonl(run.path("null_pairs.jsonl")) == nulls and eng.n_generate == n_calls


def test_a_user_set_band_and_a_text_judge(tmp_path, caplog):
    eng = scored_engine(lambda q, ans: 0.4 if "EXPERT" in ans else 0.0)
    cfg = make_cfg(tmp_path, judge={"rule": "margin", "null_pairs": 0, "abstain_margin": 0.5})
    s = run_bootstrap(cfg, engine=eng)
    recs = read_jsonl(RunDir(cfg.out).path("verdicts.jsonl"))
    assert {r["band"] for r in recs} == {0.5} and {r["margin"] for r in recs} == {0.4}
    assert s["total"]["ties"] == 10 and not RunDir(cfg.out).exists("null_pairs.jsonl")
    assert all(r["abstain"] for r in load_labelled(cfg.out))  # inside the band: left out of the gate
    # a text judge has no margins: the paper's rule decides, said once
    text = make_cfg(tmp_path, name="text", judge={"rule": "margin"})
    with caplog.at_level("INFO"):
        run_bootstrap(text, engine=BootstrapEngine())
    assert {r["rule"] for r in read_jsonl(RunDir(text.out).path("verdicts.jsonl"))} == {"both_orders"}
    assert "needs log-probabilities" in caplog.text


def test_the_rule_is_part_of_the_verdict_settings(tmp_path):
    from prism_persona.errors import ConfigMismatchError

    cfg = make_cfg(tmp_path)
    run_bootstrap(cfg, engine=scored_engine(lambda q, a: 0.0))
    with pytest.raises(ConfigMismatchError):
        run_bootstrap(make_cfg(tmp_path, judge={"rule": "margin"}), engine=scored_engine(lambda q, a: 0.0))


def test_blind_warning_says_what_the_debiased_judge_sees():
    def rec(margin_first, margin_second):
        return {
            "winner": "mixed",
            "persona_chars": 3,
            "base_chars": 4,
            "verdicts": [
                {"order": "persona_first", "winner": "A", "detail": {"logp_A": 0.0, "logp_B": -margin_first}},
                {"order": "persona_second", "winner": "A", "detail": {"logp_A": 0.0, "logp_B": -margin_second}},
            ],
        }

    recs = [rec(3.0, 2.0)] * 3 + [rec(2.0, 3.0)]  # raw letters all A; margins +0.5 x3, -0.5 x1
    diag = judge_diagnostics(recs)
    assert diag["position_a_rate"] == 1.0 and diag["blind"]
    note = debiased_note(recs)
    assert "prefers the persona on 3 of 4 pairs" in note and "mean |margin| 0.500" in note
    assert note in blind_warning(diag["blind"], "the judge", note)
    text_only = [{**r, "verdicts": [{**v, "detail": {"text": "A"}} for v in r["verdicts"]]} for r in recs]
    assert debiased_note(text_only) is None


# --------------------------------------------------------------------------------------------------
# several samples per query


def tag(ans: str) -> int:
    return int(re.search(r"#(\d)", ans).group(1))


def share_judge(chat):
    """The persona answer wins when its tag is 0 or 1, position-consistently."""
    a, b = shown(chat)
    persona_is_a = "EXPERT" in a
    good = tag(a if persona_is_a else b) in (0, 1)
    return ("A" if persona_is_a else "B") if good else ("B" if persona_is_a else "A")


def test_k_samples_records_share_labels_and_winning_samples(tmp_path):
    ref = make_cfg(tmp_path, name="k1")
    run_bootstrap(ref, engine=VariedEngine(judge_reply=share_judge))
    cfg = make_cfg(tmp_path, answers={"samples": 3})
    run_bootstrap(cfg, engine=VariedEngine(judge_reply=share_judge))
    run = RunDir(cfg.out)
    answers = read_jsonl(run.path("answers.jsonl"))
    assert len(answers) == 30 and len({a["key"] for a in answers}) == 30
    # sample 0 is exactly the k = 1 run's record (same key, seed and text)
    k1 = {a["key"]: a for a in read_jsonl(RunDir(ref.out).path("answers.jsonl"))}
    assert [a for a in answers if "sample" not in a] == list(k1.values())
    later = [a for a in answers if "sample" in a]
    assert {a["sample"] for a in later} == {1, 2} and all(a["query_key"] in k1 for a in later)
    assert len({a["persona_answer"] for a in answers}) > 10  # the samples differ
    verdicts = read_jsonl(run.path("verdicts.jsonl"))
    assert sorted(v["key"] for v in verdicts) == sorted(a["key"] for a in answers)
    labelled = load_labelled(cfg.out)
    assert len(labelled) == 10
    n_soft = 0
    for r in labelled:
        mine = [a for a in answers if a.get("query_key", a["key"]) == r["key"]]
        share = sum(tag(a["persona_answer"]) in (0, 1) for a in mine) / 3
        assert r["win_share"] == pytest.approx(share, abs=1e-4) and len(r["samples"]) == 3
        assert r["label"] == int(share >= 0.5)
        n_soft += 0 < share < 1
    assert n_soft > 0  # some queries have a soft label
    targets = gate_targets(labelled, "win")
    assert targets == pytest.approx([r["win_share"] for r in labelled], abs=1e-4)
    # the distillation set: the winning persona samples, one record each
    flat = per_sample(labelled)
    assert len(flat) == 30
    winners = [f for f in flat if f["label"] == 1]
    assert sorted(f["key"] for f in winners) == sorted(a["key"] for a in answers if tag(a["persona_answer"]) in (0, 1))
    assert all(tag(f["persona_answer"]) in (0, 1) for f in winners)
    # asking for fewer samples than were made reads only those
    saved = json.loads(run.path("config.json").read_text())
    saved["answers"]["samples"] = 2
    run.path("config.json").write_text(json.dumps(saved))
    assert {len(r["samples"]) for r in load_labelled(cfg.out)} == {2}


def test_k_samples_resume_after_kill_and_truncated_store(tmp_path):
    ref_cfg = make_cfg(tmp_path, name="ref", answers={"samples": 2})
    ref = VariedEngine(judge_reply=share_judge)
    run_bootstrap(ref_cfg, engine=ref)
    ref_files = {n: read_jsonl(tmp_path / "ref" / f"{n}.jsonl") for n in ("answers", "verdicts")}
    for k in range(ref.n_generate):
        cfg = make_cfg(tmp_path, name=f"kill{k}", answers={"samples": 2})
        with pytest.raises(KeyboardInterrupt):
            run_bootstrap(cfg, engine=VariedEngine(fail_after=k, judge_reply=share_judge))
        run_bootstrap(cfg, engine=VariedEngine(judge_reply=share_judge))
        for name, ref_recs in ref_files.items():
            recs = read_jsonl(tmp_path / f"kill{k}" / f"{name}.jsonl")
            assert len(recs) == len({r["key"] for r in recs}), (k, name)
            # resumed exactly: the same records as an uninterrupted run
            assert sorted(recs, key=lambda r: r["key"]) == sorted(ref_recs, key=lambda r: r["key"]), (k, name)
    # a store cut mid-line (killed mid-write) is completed without duplicates
    cfg = make_cfg(tmp_path, name="torn", answers={"samples": 2})
    run_bootstrap(cfg, engine=VariedEngine(judge_reply=share_judge))
    for name in ("answers", "verdicts"):
        path = RunDir(cfg.out).path(f"{name}.jsonl")
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(lines[:-3]) + lines[-3][: len(lines[-3]) // 2])
    RunDir(cfg.out).path("bootstrap.done.json").unlink(missing_ok=True)
    run_bootstrap(cfg, engine=VariedEngine(judge_reply=share_judge))
    for name in ("answers", "verdicts"):
        keys = [r["key"] for r in read_jsonl(RunDir(cfg.out).path(f"{name}.jsonl"))]
        assert len(keys) == len(set(keys)) == 20
    assert len(load_labelled(cfg.out)) == 10


def test_share_targets_leave_out_abstained_samples():
    def sample(label, winner, abstain=False, margin=None):
        return {"label": label, "winner": winner, "abstain": abstain, "margin": margin}

    rec = {
        "domain": "d",
        "label": 1,
        "samples": [sample(1, "persona"), sample(0, "base"), sample(0, "tie", abstain=True), sample(1, "persona")],
    }
    plain = {"domain": "d", "label": 0, "winner": "tie"}
    assert gate_targets([rec, plain], "win") == pytest.approx([2 / 3, 0.0])
    assert gate_targets([rec, plain], "preference") == pytest.approx([2 / 3, 0.5])


def test_k_greedy_samples_are_refused_before_anything_runs(tmp_path, capsys):
    """k > 1 samples at temperature 0 would be k identical answers per query: the labels and the
    distillation set copied k times, not k draws (the safety kits answer greedily)."""
    from prism_persona import cli
    from prism_persona.testing import one_error_line

    out = tmp_path / "greedy"
    rc = cli.main(["run", "--example", "safety", "--out", str(out), "--set", "answers.samples=4", "-q"])
    line = one_error_line(capsys)
    assert rc == 2 and "answers.samples = 4 with answers.temperature = 0" in line, line
    assert not out.exists()
    # sampled answers with k samples, and one greedy sample, pass the check
    from prism_persona.bootstrap.answers import check

    check(make_cfg(tmp_path, answers={"samples": 4, "temperature": 0.7}))
    check(make_cfg(tmp_path, answers={"samples": 1, "temperature": 0.0}))
