"""The 'shots' query format (topics first, then one request per chat after example requests of other
domains), on scripted engines (no model)."""

import json
import random

import pytest

from prism_persona import config as C
from prism_persona.bootstrap import queries as Q
from prism_persona.bootstrap.common import query_prompt_version, stage_settings
from prism_persona.errors import PrismError
from prism_persona.store import RunDir
from prism_persona.testing import ScriptedEngine

DOMAINS = ("gardening", "cooking")  # gardening is one of the shipped example domains: never shown for itself


class PrefillEngine(ScriptedEngine):
    supports_prefill = True


def cfg_for(tmp_path, fmt="shots", **queries):
    return C.resolve(
        "tiny",
        overrides={
            "out": str(tmp_path / "run"),
            "quiet": True,
            "persona": {"domains": list(DOMAINS)},
            "queries": {"format": fmt, "queries_per_persona": 4, "max_rounds": 2, **queries},
        },
    )


def personas():
    return {d: {"short": ""} for d in DOMAINS}


def replies(copy_first: bool = False):
    """A responder: topics for topic-listing chats, a distinct request per request chat (the first
    request of each domain copies a shipped example when ``copy_first``)."""
    counter = {"n": 0}
    example = Q.all_shots()[0]["request"]

    def respond(chat):
        last = chat[-1]["content"]
        if last.endswith("Topics:") or last.endswith("separated by commas, on one line."):
            return " soil testing, bread baking, 2. knife skills; and sauces"
        counter["n"] += 1
        n = counter["n"]
        if copy_first and n in (1, 7):
            return " " + example
        words = "apple bread cumin dough eggs flour garlic honey icing jam kale lemon mint nuts oats pear".split()
        return f" How do I plan job {n} with {words[n % 16]} and {words[(n * 7 + 3) % 16]}?"

    return respond


def read(tmp_path, name):
    return [json.loads(x) for x in (tmp_path / "run" / f"{name}.jsonl").read_text().splitlines()]


def test_shots_prompt_shows_requests_of_other_domains_only_and_starts_the_reply_with_field_and_topic(tmp_path):
    eng = PrefillEngine(responder=replies())
    cfg = cfg_for(tmp_path)
    assert Q.write_queries(cfg, RunDir(cfg.out), lambda: eng, personas()) == {"gardening": 4, "cooking": 4}
    garden_examples = [s["request"] for s in Q.all_shots() if s["domain"] == "gardening"]
    topic_chats = [c for c, _ in eng.calls if c[-1]["content"].endswith("Topics:")]
    request_chats = [c for c, _ in eng.calls if c[-1]["content"].endswith("Request:")]
    assert len(topic_chats) == Q.TOPIC_CHATS * len(DOMAINS)
    assert len(request_chats) + len(topic_chats) == len(eng.calls)
    for chat in topic_chats + request_chats:
        target = chat[-1]["content"].split("\n")[0].removeprefix("Field: ")
        shown = [line.removeprefix("Field: ") for line in chat[0]["content"].splitlines() if line.startswith("Field: ")]
        assert shown and target not in shown and all(not Q.related_domains(s, target) for s in shown)
        if target == "gardening":
            assert not any(ex in chat[0]["content"] for ex in garden_examples)
    first = next(c for c in request_chats if c[-1]["content"].startswith("Field: gardening"))
    assert first[-1]["content"] == "Field: gardening\nTopic: soil testing\nRequest:"
    assert first[0]["content"].count("Request: ") == Q.SHOTS_PER_PROMPT
    # the topics are written first, one batched call before the requests, and recorded per round
    rounds = read(tmp_path, "query_rounds")
    assert rounds[0]["topics"] == ["soil testing", "bread baking", "knife skills", "sauces"]
    stop = {p.stop for c, p in eng.calls if c in request_chats}
    assert stop == {("\n",)}


def test_shots_lines_are_filtered_copies_of_examples_dropped_and_counted(tmp_path):
    eng = PrefillEngine(responder=replies(copy_first=True))
    cfg = cfg_for(tmp_path)
    Q.write_queries(cfg, RunDir(cfg.out), lambda: eng, personas())
    rounds = read(tmp_path, "query_rounds")
    assert sum(r["dropped"].get("copied example", 0) for r in rounds) == 2
    queries = [r["query"] for r in read(tmp_path, "queries")]
    assert len(queries) == 8 and not set(queries) & {s["request"] for s in Q.all_shots()}
    assert all(q.startswith("How do I plan job") for q in queries)


def test_shots_without_prefill_asks_for_the_request_only_and_parses_the_labelled_reply(tmp_path):
    def respond(chat):
        text = chat[-1]["content"]
        if "Reply with the topics only" in text:
            return "Topics: bread baking, sauces"
        topic = text.split("Topic: ")[-1].split("\n")[0]
        n = len(eng.calls)
        w = "apple bread cumin dough eggs flour garlic honey icing jam kale lemon mint nuts oats pear".split()
        return f"Field: cooking\nTopic: {topic}\nRequest: Can I use {w[n % 16]} with {w[(n * 7 + 3) % 16]} today?"

    eng = ScriptedEngine(responder=respond)
    cfg = cfg_for(tmp_path)
    Q.write_queries(cfg, RunDir(cfg.out), lambda: eng, personas())
    chat, params = eng.calls[-1]
    assert len(chat) == 1 and chat[0]["content"].endswith("Reply with the request only, on one line.")
    assert params.stop == ()  # the label lines come before the request
    queries = [r["query"] for r in read(tmp_path, "queries")]
    assert len(queries) == 8 and queries[0].startswith("Can I use")
    assert read(tmp_path, "query_rounds")[0]["topics"] == ["bread baking", "sauces"]


class Killed(PrefillEngine):
    """Dies at its fourth ``generate`` call: after round 1 (topics, requests) and the topics of round 2
    were stored, before round 2's requests."""

    def generate(self, chats, params, desc=""):
        self.batches = getattr(self, "batches", 0) + 1
        if self.batches == 4:
            raise KeyboardInterrupt
        return super().generate(chats, params, desc)


def test_shots_resume_repeats_no_round_and_duplicates_nothing(tmp_path):
    calls = {"n": 0}

    def few(chat):  # round 1: only some request chats of each domain are usable
        calls["n"] += 1
        if chat[-1]["content"].endswith("Topics:"):
            return "bread baking"
        w = "apple bread cumin dough eggs flour garlic honey icing jam kale lemon mint nuts oats pear".split()
        return f" Can I mix {w[calls['n'] % 16]} into {w[(calls['n'] * 5 + 2) % 16]}?" if calls["n"] % 5 < 2 else "ok"

    cfg = cfg_for(tmp_path)
    killed = Killed(responder=few)
    with pytest.raises(KeyboardInterrupt):
        Q.write_queries(cfg, RunDir(cfg.out), lambda: killed, personas())
    first = read(tmp_path, "queries")
    assert 0 < len(first) < 8
    eng = PrefillEngine(responder=replies())
    cfg2 = cfg_for(tmp_path)
    assert Q.write_queries(cfg2, RunDir(cfg2.out), lambda: eng, personas()) == {"gardening": 4, "cooking": 4}
    after = read(tmp_path, "queries")
    assert after[: len(first)] == first and len(after) == 8
    # round 2's topics were stored before the kill: the resumed run reuses them instead of writing them again
    assert not [c for c, _ in eng.calls if c[-1]["content"].endswith("Topics:")]
    assert [(r["domain"], r["round"]) for r in read(tmp_path, "query_topics")] == [
        ("gardening", 0),
        ("cooking", 0),
        ("gardening", 1),
        ("cooking", 1),
    ]
    assert len({r["key"] for r in after}) == 8
    assert sorted((r["domain"], r["round"]) for r in read(tmp_path, "query_rounds")) == [
        ("cooking", 0),
        ("cooking", 1),
        ("gardening", 0),
        ("gardening", 1),
    ]
    # a finished stage resumes without a call
    idle = PrefillEngine(responder=replies())
    Q.write_queries(cfg2, RunDir(cfg2.out), lambda: idle, personas())
    assert idle.calls == [] and read(tmp_path, "queries") == after


def test_formats_do_not_mix_on_resume_and_the_old_formats_prompts_are_unchanged(tmp_path):
    cfg = cfg_for(tmp_path)
    Q.write_queries(cfg, RunDir(cfg.out), lambda: PrefillEngine(responder=replies()), personas())
    one = cfg_for(tmp_path, fmt="one")
    with pytest.raises(PrismError, match="other settings"):
        Q.write_queries(one, RunDir(one.out), lambda: PrefillEngine(responder=replies()), personas())
    s = stage_settings(cfg, "queries")["queries"]
    assert s["format"] == "shots" and s["prompt"] == query_prompt_version("shots")
    # the hashes runs made before this format resume with (c89e95b)
    assert query_prompt_version("one") == "bafb79721aab" and query_prompt_version("list") == "c990c8bad636"


def test_one_format_rounds_carry_no_topics_and_see_no_examples(tmp_path):
    eng = PrefillEngine(responder=replies())
    cfg = cfg_for(tmp_path, fmt="one")
    Q.write_queries(cfg, RunDir(cfg.out), lambda: eng, personas())
    assert all("topics" not in r for r in read(tmp_path, "query_rounds"))
    assert all("Field:" not in c[0]["content"] for c, _ in eng.calls)


def test_related_domains_and_topic_parsing():
    assert Q.related_domains("law", "tax law") and Q.related_domains("Medicine", "medical")
    assert Q.related_domains("creative writing", "writing") and not Q.related_domains("art", "parenting")
    assert all(not Q.related_domains(e["domain"], "car mechanics") for e in Q.other_domains("car mechanics"))
    assert len(Q.pick_shots("cooking", random.Random(1))) == Q.SHOTS_PER_PROMPT
    assert len({s["domain"] for s in Q.pick_shots("cooking", random.Random(1))}) == Q.SHOTS_PER_PROMPT
    assert Q.parse_topics(" resume writing, 1. editing; and poetry.\nTopics: a, resume Writing") == [
        "resume writing",
        "editing",
        "poetry",
    ]


def test_the_example_requests_ship_as_package_data():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    package_data = (root / "pyproject.toml").read_text().split("[tool.setuptools.package-data]")[1].split("[")[1]
    assert '"bootstrap/query_shots.json"' in package_data
    assert (root / "src" / "prism_persona" / "bootstrap" / "query_shots.json").is_file()
    shots = Q.shots_data()
    assert len(shots) >= Q.SHOTS_PER_PROMPT + 2 and all(len(e["topics"]) >= 3 and e["requests"] for e in shots)
    assert all(Q.looks_like_request(s["request"]) for s in Q.all_shots())
