"""The bootstrap stages and pipeline with scripted engines and the tiny random model."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from prism_persona import cli
from prism_persona import config as C
from prism_persona.bootstrap.answers import answer_chats
from prism_persona.bootstrap.common import Lazy, derive_seed
from prism_persona.bootstrap.personas import clean_persona, fallback_persona, load_personas, write_personas
from prism_persona.bootstrap.queries import clean_query_line, parse_queries, write_queries
from prism_persona.config import QueryConfig
from prism_persona.engines.base import SamplingParams
from prism_persona.errors import ConfigMismatchError, PrismError
from prism_persona.options import merge
from prism_persona.store import RunDir
from prism_persona.testing import PERSONA_REPLY, BootstrapEngine, ScriptedEngine
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


# --------------------------------------------------------------------------------------------------
# cleaning


@pytest.mark.parametrize(
    "raw, length, expected",
    [
        (
            PERSONA_REPLY.format(d="law"),
            "short",
            "You are a seasoned law specialist with twenty years of practice. You give precise, practical advice and explain trade-offs clearly.",
        ),
        (PERSONA_REPLY.format(d="law"), "min", "You are a seasoned law specialist with twenty years of practice."),
        (
            "**Description:** you are an expert chef who teaches home cooks",
            "min",
            "You are an expert chef who teaches home cooks.",
        ),
        (
            "As requested, the persona. You are a careful editor who improves clarity of any text.\n\nLet me know if you need changes.",
            "short",
            "You are a careful editor who improves clarity of any text.",
        ),
        (
            "You are a patient maths tutor. You are a patient maths tutor. You explain each step.",
            "short",
            "You are a patient maths tutor. You explain each step.",
        ),
        ("I like turtles very much indeed.", "short", ""),
        ("", "min", ""),
        ("You are.", "short", ""),
    ],
)
def test_clean_persona(raw, length, expected):
    assert clean_persona(raw, length) == expected


def test_clean_persona_caps_length():
    raw = "You are an expert. " + " ".join(f"You know thing {i} well." for i in range(80))
    out = clean_persona(raw, "short")
    assert out.startswith("You are an expert.") and 8 <= len(out.split()) <= 110 and out.endswith(".")


@pytest.mark.parametrize(
    "line, expected",
    [
        ("1. How do I write a cover letter?", "How do I write a cover letter?"),
        ("2) What's a good essay outline?", "What's a good essay outline?"),
        ("- Query: How can I improve dialogue?", "How can I improve dialogue?"),
        ('* "Why is my Python loop slow?"', "Why is my Python loop slow?"),
        ("3. **Question:** How to sort a dict by value?", "How to sort a dict by value?"),
        ("Here are 10 questions you might ask:", ""),
        ("Sure, these are realistic queries for an expert", ""),
        ("Short?", ""),
        ("x" * 700, ""),
        ("12345 67890 12345", ""),
    ],
)
def test_clean_query_line(line, expected):
    assert clean_query_line(line, 15, 600) == expected


def test_parse_queries_dedupes_case_and_whitespace():
    text = "1. How do I  write a cover letter?\n2. how do i write a COVER letter\n\n3. Another different question here?"
    assert parse_queries(text, QueryConfig(requests_only=False)) == [
        "How do I write a cover letter?",
        "Another different question here?",
    ]


# --------------------------------------------------------------------------------------------------
# stages


def test_personas_model_fallback_and_file(tmp_path):
    pfile = tmp_path / "law.txt"
    pfile.write_text("  You are a barrister.\nKeep it formal.  \n")
    cfg = make_cfg(tmp_path, persona={"domains": ["writing", "junk", "law"], "persona_files": {"law": str(pfile)}})
    run = RunDir(cfg.out)

    def reply(chat):
        return "???" if "expert in junk" in chat[-1]["content"] else PERSONA_REPLY.format(d="writing")

    eng = ScriptedEngine(responder=reply)
    counts = write_personas(cfg, run, Lazy(lambda: eng))
    assert counts == {"model": 3, "fallback": 3, "file": 3}
    p = load_personas(run)
    assert p["law"] == {L: "You are a barrister.\nKeep it formal." for L in ("min", "short", "long")}
    assert p["junk"]["short"] == fallback_persona("junk", "short") and p["junk"]["min"] == "You are an expert in junk."
    assert p["writing"]["min"] == "You are a seasoned writing specialist with twenty years of practice."
    assert len(eng.calls) == 6  # no generation for the file persona
    prompts = [c[-1]["content"] for c, _ in eng.calls]
    assert any("one short sentence" in x for x in prompts) and any("about 150 words" in x for x in prompts)
    write_personas(cfg, run, Lazy(lambda: pytest.fail("nothing left to generate")))
    recs = read_jsonl(run.path("personas.jsonl"))
    assert len(recs) == 9 and {r["source"] for r in recs} == {"model", "fallback", "file"}


class PrefillEngine(ScriptedEngine):
    supports_prefill = True


def test_personas_prefill_the_reply_and_refuse_the_wrong_expert(tmp_path, caplog):
    cfg = make_cfg(
        tmp_path, persona={"domains": ["physics", "creative writing"], "lengths": ["min"], "use_length": "min"}
    )

    def reply(chat):  # a prefill-capable engine returns only the continuation
        assert chat[-1] == {"role": "assistant", "content": "You are"}
        if "expert in physics" in chat[-2]["content"]:
            return "an AI assistant designed to support creative writing."  # the wrong expert
        return "a novelist who teaches creative writing workshops."

    counts = write_personas(cfg, RunDir(cfg.out), Lazy(lambda: PrefillEngine(responder=reply)))
    assert counts == {"model": 1, "fallback": 1, "file": 0}
    p = load_personas(RunDir(cfg.out))
    assert p["creative writing"]["min"] == "You are a novelist who teaches creative writing workshops."
    assert p["physics"]["min"] == fallback_persona("physics", "min")
    raw = {r["domain"]: r["raw"] for r in read_jsonl(RunDir(cfg.out).path("personas.jsonl"))}
    assert raw["physics"] == "You are an AI assistant designed to support creative writing."

    # an engine that cannot continue a reply gets the plain prompt, and the log says so
    cfg2 = make_cfg(tmp_path, "run2", persona={"domains": ["physics"], "lengths": ["min"], "use_length": "min"})
    eng = ScriptedEngine(responder=lambda chat: "You are a physicist who studies lasers.")
    write_personas(cfg2, RunDir(cfg2.out), Lazy(lambda: eng))
    assert eng.calls[0][0][-1]["role"] == "user"
    assert "cannot continue a started reply" in caplog.text
    assert load_personas(RunDir(cfg2.out))["physics"]["min"] == "You are a physicist who studies lasers."


def test_a_run_made_before_the_prefill_resumes_with_the_prefill_off(tmp_path):
    from prism_persona.bootstrap.common import stage_settings

    cfg = make_cfg(tmp_path)
    assert stage_settings(cfg, "personas")["persona"]["prefill"] == "You are"
    old = make_cfg(tmp_path, persona={"domains": ["writing", "coding"], "prefill": ""})
    assert "prefill" not in stage_settings(old, "personas")["persona"]  # what such a run stored
    files = make_cfg(tmp_path, persona={"domains": ["law"], "persona_files": {"law": __file__}})
    assert "prefill" not in stage_settings(files, "personas")["persona"]  # no persona is written by the model


@pytest.mark.parametrize(
    "text,domain,others,usable",
    [
        ("You are a medical doctor who treats children.", "medicine", ["medicine", "law"], True),
        ("You are a master chef who cooks with seasonal food.", "cooking", ["cooking", "law"], True),  # synonyms pass
        (
            "You are a lawyer who drafts contracts and argues cases.",
            "cooking",
            ["cooking", "law"],
            False,
        ),  # wrong expert
        ("You are a lawyer who drafts contracts and argues cases.", "law", ["cooking", "law"], True),
        ("You are an AI designed to help, please ask me anything.", "finance", ["finance"], False),
        ("You are an AI assistant for finance questions and budgets.", "finance", ["finance"], True),
    ],
)
def test_clean_persona_domain_checks(text, domain, others, usable):
    assert bool(clean_persona(text, "min", domain, others)) is usable


def test_persona_file_edited_on_resume_is_refused(tmp_path):
    pfile = tmp_path / "law.txt"
    pfile.write_text("You are a barrister.")
    cfg = make_cfg(tmp_path, persona={"domains": ["law"], "persona_files": {"law": str(pfile)}})
    run_bootstrap(cfg, engine=BootstrapEngine())
    pfile.write_text("You are a solicitor.")
    with pytest.raises(ConfigMismatchError, match="persona.files.law"):
        run_bootstrap(cfg, engine=BootstrapEngine())
    pfile.unlink()
    with pytest.raises(PrismError, match="persona file for 'law' not found"):
        run_bootstrap(cfg, engine=BootstrapEngine())


def test_queries_rounds_dedupe_and_seeds(tmp_path, caplog):
    cfg = make_cfg(
        tmp_path,
        queries={"queries_per_persona": 6, "per_request": 4, "max_rounds": 3, "format": "list", "oversample": 1},
    )
    run = RunDir(cfg.out)
    personas = {d: {"short": f"You are a {d} expert."} for d in cfg.persona.domains}
    replies = {
        "writing": ["1. How do I write a cover letter?\n2. How do I outline a short essay?"],
        "coding": ["- Why is my Python loop slow?"],
    }

    def reply(chat):  # the same lines every round: later rounds add nothing new
        dom = "writing" if "about writing" in chat[-1]["content"] else "coding"
        return replies[dom][0] + "\n" + chat[-1]["content"][:0] + "Here are more:"

    eng = ScriptedEngine(responder=reply)
    got = write_queries(cfg, run, Lazy(lambda: eng), personas)
    assert got == {"writing": 2, "coding": 1}
    assert "only 2 of 6 unique queries for 'writing' after 3 rounds" in caplog.text
    qs = read_jsonl(run.path("queries.jsonl"))
    assert [q["query"] for q in qs] == [
        "How do I write a cover letter?",
        "How do I outline a short essay?",
        "Why is my Python loop slow?",
    ]
    seeds = [p.seed for _, p in eng.calls]
    # a round batches every domain that still needs queries into one call, seeded from the run seed and
    # the (domain, round) pairs in it; round 0 asks ceil(6/4) = 2 lists of each domain
    assert seeds[:4] == [derive_seed(0, "queries", ("writing", 0), ("coding", 0))] * 4
    doms = ["writing" if "about writing" in c[-1]["content"] else "coding" for c, _ in eng.calls]
    assert doms == ["writing"] * 2 + ["coding"] * 2 + ["writing"] + ["coding"] * 2 + ["writing"] + ["coding"] * 2
    assert len(set(seeds)) == 3  # one seed per round
    first, second = eng.calls[0][0], eng.calls[1][0]
    assert (
        first[0] == {"role": "system", "content": "You are a writing expert."} and "4 realistic" in first[1]["content"]
    )
    assert "list 1 of 2" in first[1]["content"] and "list 2 of 2" in second[1]["content"]  # distinct requests
    # resuming: every round is recorded, so nothing is generated again
    write_queries(cfg, run, Lazy(lambda: pytest.fail("rounds are exhausted")), personas)
    assert len(read_jsonl(run.path("query_rounds.jsonl"))) == 6


def test_oversample_asks_for_more_lists_per_round(tmp_path):
    cfg = make_cfg(
        tmp_path,
        queries={"queries_per_persona": 6, "per_request": 4, "max_rounds": 2, "oversample": 2, "format": "list"},
    )
    run = RunDir(cfg.out)
    personas = {d: {"short": f"You are a {d} expert."} for d in cfg.persona.domains}
    # distinct words per line, so the near-duplicate filter keeps every one
    lines = iter(f"Why is alpha{i} beta{i} gamma{i} delta{i} hard?" for i in range(100))
    eng = ScriptedEngine(responder=lambda chat: next(lines))  # one new query per list
    got = write_queries(cfg, run, Lazy(lambda: eng), personas)
    doms = ["writing" if "about writing" in c[-1]["content"] else "coding" for c, _ in eng.calls]
    # round 0: ceil(2 x 6 / 4) = 3 lists per domain (3 queries each); round 1: ceil(2 x 3 / 4) = 2 lists
    assert doms == ["writing"] * 3 + ["coding"] * 3 + ["writing"] * 2 + ["coding"] * 2
    assert "list 3 of 3" in eng.calls[2][0][1]["content"]
    assert got == {"writing": 5, "coding": 5}


@pytest.mark.parametrize("scored", [True, False])
def test_topic_check_drops_off_domain_queries_and_counts_them(tmp_path, caplog, scored):
    import logging

    caplog.set_level(logging.INFO)
    cfg = make_cfg(
        tmp_path,
        persona={"domains": ["cooking"]},
        queries={"queries_per_persona": 3, "per_request": 3, "max_rounds": 2, "topic_check": True, "format": "list"},
    )
    lines = ["How long should I rest a steak?", "Who won the 1990 World Cup final?", "How do I make a roux?"]

    def topic_says(chat):
        return "World Cup" not in chat[-1]["content"]

    def reply(chat):
        text = chat[-1]["content"]
        if text.startswith("Is the following request about cooking?"):
            return "Yes." if topic_says(chat) else "No, it is not."
        return "\n".join(lines)

    scorer = lambda chat, choices: {"Yes": -0.1, "No": -2.0} if topic_says(chat) else {"Yes": -2.0, "No": -0.1}
    eng = ScriptedEngine(responder=reply, scorer=scorer if scored else None)
    run = RunDir(cfg.out)
    got = write_queries(cfg, run, Lazy(lambda: eng), {"cooking": {"short": "You are a chef."}})
    assert got == {"cooking": 2}
    assert [q["query"] for q in read_jsonl(run.path("queries.jsonl"))] == [lines[0], lines[2]]
    rounds = read_jsonl(run.path("query_rounds.jsonl"))
    assert [r["off_topic"] for r in rounds] == [1, 0]  # round 2 repeats the lines: nothing new to check
    assert "off-topic for 'cooking', dropped: Who won the 1990 World Cup final?" in caplog.text
    assert (len(eng.score_calls) > 0) is scored
    # the default (off) asks nothing and keeps the line
    cfg2 = make_cfg(
        tmp_path,
        "run2",
        persona={"domains": ["cooking"]},
        queries={"queries_per_persona": 3, "per_request": 3, "format": "list"},
    )
    eng2 = ScriptedEngine(responder=reply, scorer=scorer)
    assert write_queries(cfg2, RunDir(cfg2.out), Lazy(lambda: eng2), {"cooking": {"short": "You are a chef."}}) == {
        "cooking": 3
    }
    assert not eng2.score_calls and all("Is the following" not in c[-1]["content"] for c, _ in eng2.calls)


def test_query_prompt_user_placement(tmp_path):
    cfg = make_cfg(
        tmp_path,
        persona={"domains": ["law"], "placement": "user"},
        queries={"queries_per_persona": 2, "per_request": 2, "format": "list"},
    )
    eng = ScriptedEngine(responder=lambda c: "What is a tort in English law?\nHow long does probate take?")
    write_queries(cfg, RunDir(cfg.out), Lazy(lambda: eng), {"law": {"short": "You are a lawyer."}})
    chat = eng.calls[0][0]
    assert (
        len(chat) == 1 and chat[0]["role"] == "user" and chat[0]["content"].startswith("You are a lawyer.\n\nWrite 2")
    )


def test_answer_chats():
    base, sys_chat = answer_chats("What is X?", "You are P.", "system")
    assert base == [{"role": "user", "content": "What is X?"}]
    assert sys_chat == [{"role": "system", "content": "You are P."}, {"role": "user", "content": "What is X?"}]
    _, user_chat = answer_chats("What is X?", "You are P.", "user")
    assert user_chat == [{"role": "user", "content": "You are P.\n\nWhat is X?"}]


# --------------------------------------------------------------------------------------------------
# the whole pipeline


def test_pipeline_files_labels_and_summary(tmp_path):
    cfg = make_cfg(tmp_path)
    eng = BootstrapEngine()
    summary = run_bootstrap(cfg, engine=eng)
    run = RunDir(cfg.out)
    for name in (
        "config.json",
        "personas.jsonl",
        "queries.jsonl",
        "answers.jsonl",
        "verdicts.jsonl",
        "summary.json",
        "summary.md",
        "bootstrap.done.json",
    ):
        assert run.exists(name), name
    saved = json.loads(run.path("config.json").read_text())
    assert saved["persona"]["domains"] == ["writing", "coding"] and saved["prism_version"]
    answers = read_jsonl(run.path("answers.jsonl"))
    assert len(answers) == 10
    a = answers[0]
    assert a["persona_answer"].startswith("EXPERT") and a["base_answer"].startswith("plain")
    assert a["base_tokens"] > 0 and a["persona_length"] == "short" and a["placement"] == "system"
    # base answers were generated from the bare [user: query] chat
    base_chats = [c for c, _ in eng.calls if len(c) == 1 and c[0]["content"] == a["query"]]
    assert base_chats
    v = read_jsonl(run.path("verdicts.jsonl"))[0]
    assert [x["order"] for x in v["verdicts"]] == ["persona_first", "persona_second"]
    assert [x["winner"] for x in v["verdicts"]] == ["A", "B"] and v["winner"] == "persona" and v["label"] == 1
    assert summary["total"]["wins"] == 10 and summary["domains"]["coding"]["queries"] == 5
    assert summary["judge_diagnostics"]["flip_rate"] == 0.0 and summary["judge_diagnostics"]["position_a_rate"] == 0.5
    assert json.loads(run.path("summary.json").read_text())["total"] == summary["total"]
    assert "| writing" in run.path("summary.md").read_text()
    assert summary["answers"]["looping"] == {"base": 0, "persona": 0}
    assert re.search(
        r"looping answers \(a phrase 4\+ times in a row\): base / persona +\| +0 / 0 ",
        run.path("summary.md").read_text(),
    )
    labelled = load_labelled(cfg.out)
    assert len(labelled) == 10 and all(r["label"] == 1 for r in labelled)
    assert set(labelled[0]) >= {
        "key",
        "domain",
        "query",
        "persona",
        "placement",
        "base_answer",
        "persona_answer",
        "label",
        "persona_finish",
    }
    assert {r["persona_finish"] for r in labelled} == {"stop"}  # the scripted engine's answers all ended
    assert labelled[0]["persona"] == load_personas(cfg.out)[labelled[0]["domain"]]["short"]
    # a finished run resumes without building an engine
    again = run_bootstrap(cfg, engine=BootstrapEngine(fail_after=0))
    assert again["total"] == summary["total"]


def test_position_biased_judge_gives_no_labels(tmp_path):
    cfg = make_cfg(tmp_path, persona={"domains": ["writing"]})
    s = run_bootstrap(cfg, engine=BootstrapEngine(judge_reply=lambda chat: "A"))
    assert s["total"]["wins"] == 0 and s["total"]["mixed"] == 5
    assert s["judge_diagnostics"]["flip_rate"] == 1.0 and s["judge_diagnostics"]["position_a_rate"] == 1.0
    assert all(r["label"] == 0 for r in load_labelled(cfg.out))


def test_unparseable_and_tie_counted_not_raised(tmp_path):
    replies = iter(["tie", "tie", "hmm", "A"] * 10)
    cfg = make_cfg(tmp_path, persona={"domains": ["writing"]}, queries={"queries_per_persona": 4})
    s = run_bootstrap(cfg, engine=BootstrapEngine(judge_reply=lambda chat: next(replies)))
    assert s["domains"]["writing"]["ties"] == 2 and s["domains"]["writing"]["unparseable"] == 2
    assert s["judge_diagnostics"]["unparseable_rate"] == 0.5 and s["total"]["wins"] == 0


def test_logprob_self_judge_in_pipeline(tmp_path):
    def scorer(chat, choices):
        a = chat[-1]["content"].split("[Response A]")[1].split("[Response B]")[0]
        return {"A": -0.1, "B": -3.0} if "EXPERT" in a else {"A": -3.0, "B": -0.1}

    eng = BootstrapEngine()
    eng.scorer = scorer
    cfg = make_cfg(tmp_path, persona={"domains": ["writing"]})
    s = run_bootstrap(cfg, engine=eng)
    assert s["judge_mode"] == "logprob" and s["total"]["wins"] == 5
    assert read_jsonl(RunDir(cfg.out).path("verdicts.jsonl"))[0]["verdicts"][0]["detail"] == {
        "logp_A": -0.1,
        "logp_B": -3.0,
    }


def test_resume_after_kill_at_every_point(tmp_path):
    ref_cfg = make_cfg(tmp_path, name="ref")
    ref = BootstrapEngine()
    ref_tokens = run_bootstrap(ref_cfg, engine=ref)["tokens"]["total"]["tokens_generated"]
    total_calls = ref.n_generate
    ref_files = {n: read_jsonl(tmp_path / "ref" / f"{n}.jsonl") for n in ("personas", "queries", "answers", "verdicts")}
    assert total_calls > 8
    for k in range(total_calls):
        cfg = make_cfg(tmp_path, name=f"kill{k}")
        with pytest.raises(KeyboardInterrupt):
            run_bootstrap(cfg, engine=BootstrapEngine(fail_after=k))
        s = run_bootstrap(cfg, engine=BootstrapEngine())
        # nothing stored was generated twice, and the killed invocation's tokens were kept
        assert s["tokens"]["total"]["tokens_generated"] == ref_tokens, k
        for name, ref_recs in ref_files.items():
            recs = read_jsonl(tmp_path / f"kill{k}" / f"{name}.jsonl")
            keys = [r["key"] for r in recs]
            assert len(keys) == len(set(keys)), (k, name)
            assert sorted(keys) == sorted(r["key"] for r in ref_recs), (k, name)
        assert len(load_labelled(cfg.out)) == 10


def test_resume_after_torn_write(tmp_path):
    cfg = make_cfg(tmp_path)
    run_bootstrap(cfg, engine=BootstrapEngine())
    path = RunDir(cfg.out).path("verdicts.jsonl")
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-2]) + lines[-2][: len(lines[-2]) // 2])  # killed mid-write
    s = run_bootstrap(cfg, engine=BootstrapEngine())
    keys = [r["key"] for r in read_jsonl(path)]
    assert len(keys) == len(set(keys)) == 10 and s["total"]["wins"] == 10


def test_changed_settings_are_refused(tmp_path):
    cfg = make_cfg(tmp_path)
    run_bootstrap(cfg, engine=BootstrapEngine())
    before = RunDir(cfg.out).path("config.json").read_text()
    for over, msg in [
        ({"answers": {"temperature": 0.1}}, "answers.temperature: 0.7 -> 0.1"),
        ({"model": {"model": "other/model"}}, "model: 'smollm2-135m-instruct' -> 'other/model'"),
        ({"judge": {"tie_margin": 0.5}}, "judge.tie_margin"),
        ({"persona": {"placement": "user"}}, "persona.placement"),
    ]:
        with pytest.raises(ConfigMismatchError, match=msg):
            run_bootstrap(make_cfg(tmp_path, **over), engine=BootstrapEngine(fail_after=0))
    assert RunDir(cfg.out).path("config.json").read_text() == before
    # more domains or more queries extend the run instead
    s = run_bootstrap(
        make_cfg(tmp_path, persona={"domains": ["writing", "coding", "math"]}, queries={"queries_per_persona": 6}),
        engine=BootstrapEngine(),
    )
    assert s["total"]["queries"] == 18
    assert len(load_labelled(cfg.out)) == 18


def test_load_labelled_errors_and_partial(tmp_path, caplog):
    with pytest.raises(PrismError, match="no bootstrap verdicts"):
        load_labelled(tmp_path / "empty")
    cfg = make_cfg(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_bootstrap(cfg, engine=BootstrapEngine(fail_after=12))
    part = load_labelled(cfg.out)
    assert 0 < len(part) < 10 and "has not finished" in caplog.text


def test_tiny_model_end_to_end_in_process(tmp_path, tiny_model_dir, tiny_model):
    """The real HF engine and logprob self-judge on a tiny random model (content is noise)."""
    from prism_persona.engines import make_engine

    cfg = make_cfg(
        tmp_path,
        model={"model": str(tiny_model_dir), "dtype": "float32", "device": "cpu", "batch_size": 4},
        persona={"domains": ["writing", "coding"], "max_new_tokens": 16},
        queries={
            "queries_per_persona": 2,
            "per_request": 2,
            "max_new_tokens": 48,
            "max_rounds": 2,
            "min_chars": 3,
            "requests_only": False,
        },  # random text is never a question
        answers={"max_new_tokens": 6},
    )
    engine = make_engine(cfg, *tiny_model)
    s = run_bootstrap(cfg, engine=engine)
    run = RunDir(cfg.out)
    assert s["judge_mode"] == "logprob" and s["personas"]["fallback"] == 6  # random text is never a persona
    n = s["total"]["queries"]
    assert n == len(read_jsonl(run.path("verdicts.jsonl"))) and n >= 1
    assert s["tokens"]["this_invocation"]["tokens_generated"] > 0 and s["tokens"]["total"]["tokens_per_s"] > 0
    again = run_bootstrap(cfg, engine=engine)  # finished: nothing generated, totals kept
    assert again["tokens"]["this_invocation"]["tokens_generated"] == 0
    assert again["tokens"]["total"] == s["tokens"]["total"] and again["tokens"]["total"]["invocations"] == 1
    assert all(a["base_tokens"] <= 6 for a in read_jsonl(run.path("answers.jsonl")))
    v = read_jsonl(run.path("verdicts.jsonl"))[0]
    assert set(v["verdicts"][0]["detail"]) == {"logp_A", "logp_B"}


def test_sampling_is_seeded(tmp_path):
    cfg = make_cfg(tmp_path, persona={"domains": ["writing"]})
    e1, e2 = BootstrapEngine(), BootstrapEngine()
    run_bootstrap(cfg, engine=e1)
    run_bootstrap(make_cfg(tmp_path, name="again", persona={"domains": ["writing"]}), engine=e2)
    assert [p.seed for _, p in e1.calls] == [p.seed for _, p in e2.calls]
    gen = [p for _, p in e1.calls if p.temperature > 0]
    assert gen and all(isinstance(p.seed, int) for p in gen)
    assert isinstance(SamplingParams().seed, type(None))


# --------------------------------------------------------------------------------------------------
# the `prism bootstrap` command


def prism(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "prism_persona.cli", "bootstrap", *args], capture_output=True, text=True, timeout=timeout
    )


def assert_one_line_error(out, text):
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    err = out.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("prism bootstrap: error:") and text in err, err


@pytest.mark.parametrize(
    "args, text",
    [
        (["--domains", "writing,writing"], "duplicate domain names: writing"),
        (["--domains", "writing", "--persona-file", "writing=/no/such/persona.txt"], "persona file not found"),
        (["--domains", "writing", "--model", "./no/such/model"], "model path not found"),
        (
            ["--domains", "writing", "--judge", "no_such_judge_module:pick"],
            "cannot import judge module 'no_such_judge_module'",
        ),
    ],
)
@pytest.mark.subprocess
def test_cli_one_line_errors(tmp_path, args, text):
    out = prism(*args, "--out", str(tmp_path / "run"))
    assert_one_line_error(out, text)
    assert not (tmp_path / "run" / "config.json").exists()  # refused before anything was written


def test_cli_more_errors_in_process(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    cases = [
        (["--domains", "a", "--config", str(bad), "--out", str(tmp_path / "r1")], "malformed config file"),
        (["--domains", "a", "--out", str(blocker / "sub")], "cannot write to output directory"),
        (["--domains", " ,", "--out", str(tmp_path / "r2")], "--domains is empty"),
        (["--out", str(tmp_path / "r3")], "no domains given"),
        (
            ["--domains", "a", "--persona-file", f"a={empty}", "--out", str(tmp_path / "r4")],
            "persona file for 'a' is empty",
        ),
        (
            ["--domains", "a", "--judge", "os:no_such_fn", "--out", str(tmp_path / "r5")],
            "has no attribute 'no_such_fn'",
        ),
    ]
    for args, text in cases:
        assert cli.main(["bootstrap", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and text in err, (args, err)


@pytest.mark.subprocess
def test_cli_resume_refuses_changed_settings(tmp_path):
    """A run made in-process; the CLI resumes it from RUN/config.json and refuses a changed setting
    before loading any model."""
    from prism_persona.train.pipeline import run_bootstrap

    run = tmp_path / "run"
    cfg = C.resolve(
        "tiny",
        overrides={
            "out": str(run),
            "quiet": True,
            "persona": {"domains": ["writing"]},
            "queries": {"queries_per_persona": 2},
        },
    )
    run_bootstrap(cfg, engine=BootstrapEngine())
    out = prism("--out", str(run), "--answer-tokens", "7")
    assert_one_line_error(out, "holds 'answers' records made with other settings (answers.max_new_tokens: 96 -> 7)")
    out = prism("--out", str(run), "--domains", "writing", "--model", "HuggingFaceTB/other-model")
    assert_one_line_error(out, "model: 'smollm2-135m-instruct' -> 'HuggingFaceTB/other-model'")


@pytest.mark.subprocess
@pytest.mark.slow
def test_cli_embedded_model_end_to_end(tmp_path):
    """The real embedded SmolLM2-135M on a tiny setting: every file, the summary and the table."""
    run = tmp_path / "run"
    args = [
        "--preset",
        "tiny",
        "--domains",
        "writing",
        "--queries-per-persona",
        "2",
        "--answer-tokens",
        "24",
        "--set",
        "persona.max_new_tokens=48",
        "--set",
        "persona.lengths=min,short",
        "--set",
        "queries.max_new_tokens=120",
        "--set",
        "queries.max_rounds=2",
        "--out",
        str(run),
        "-q",
    ]
    out = prism(*args, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    for name in (
        "config.json",
        "personas.jsonl",
        "queries.jsonl",
        "answers.jsonl",
        "verdicts.jsonl",
        "summary.json",
        "summary.md",
    ):
        assert (run / name).is_file(), name
    s = json.loads((run / "summary.json").read_text())
    assert s["judge_mode"] == "logprob" and s["model"] == "smollm2-135m-instruct"
    n = s["domains"]["writing"]["queries"]
    assert 1 <= n <= 2 and sum(s["total"][k] for k in ("wins", "losses", "ties", "mixed", "unparseable")) == n
    assert s["tokens"]["total"]["tokens_generated"] > 0 and s["tokens"]["total"]["tokens_per_s"] > 0
    personas = [json.loads(x) for x in (run / "personas.jsonl").read_text().splitlines()]
    assert len(personas) == 2 and all(p["text"].startswith("You") for p in personas)
    assert "| writing" in out.stdout and "flip rate" in out.stdout and "## Data report" in out.stdout
    # rerunning the finished run is instant and changes nothing
    before = (run / "verdicts.jsonl").read_text()
    again = prism("--out", str(run), "-q", timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (run / "verdicts.jsonl").read_text() == before
    s2 = json.loads((run / "summary.json").read_text())
    assert s2["tokens"]["this_invocation"]["tokens_generated"] == 0 and s2["tokens"]["total"] == s["tokens"]["total"]


def test_query_prompt_and_filter_are_part_of_the_queries_settings(tmp_path, monkeypatch):
    """Resuming a run whose queries were written with another prompt or filter is refused (not mixed)."""
    import prism_persona.bootstrap.prompts as Q
    from prism_persona.bootstrap.common import stage_settings

    cfg = make_cfg(tmp_path, queries={"format": "one"})
    before = stage_settings(cfg, "queries")
    assert (
        stage_settings(
            make_cfg(tmp_path, queries={"format": "one", "requests_only": not cfg.queries.requests_only}), "queries"
        )
        != before
    )
    monkeypatch.setattr(Q, "REQUEST_PROMPT", Q.REQUEST_PROMPT + " Be brief.")  # the 'one' format
    assert stage_settings(cfg, "queries")["queries"]["prompt"] != before["queries"]["prompt"]
    listed = make_cfg(tmp_path, queries={"format": "list"})
    before = stage_settings(listed, "queries")
    assert "format" not in before["queries"]  # runs made with the list format resume unchanged
    monkeypatch.setattr(Q, "QUERY_PROMPT", Q.QUERY_PROMPT + " Be brief.")
    assert stage_settings(listed, "queries")["queries"]["prompt"] != before["queries"]["prompt"]
