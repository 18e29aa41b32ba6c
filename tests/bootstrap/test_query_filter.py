"""The query filters and the one-request query format, on scripted engines (no model)."""

import json
import math

from prism_persona import config as C
from prism_persona.bootstrap.queries import (
    QueryFilter,
    first_request,
    persona_markers,
    write_queries,
)
from prism_persona.store import RunDir
from prism_persona.testing import ScriptedEngine

PIRATE = (
    "You are Captain Salty, an old pirate who answers every question in pirate speech. Always begin your answer "
    'with "Arr, matey!". Call the user "matey", say "ye" instead of "you", "aye" instead of "yes".'
)


def qcfg(**kw):
    return C.resolve("tiny", overrides={"queries": kw, "persona": {"domains": ["stories"]}}).queries


def test_first_request_cuts_the_rambling_after_the_request():
    assert first_request("Why does the weather change? On the day I was brought to the beach") == (
        "Why does the weather change?"
    )
    assert first_request("Write a poem about rain. Then I will read it aloud") == "Write a poem about rain."
    assert first_request("How do I sort a list in Python") == "How do I sort a list in Python"


def test_persona_markers_are_the_personas_name_and_catchphrases_not_common_words():
    marks = persona_markers(PIRATE)
    assert "Captain Salty" in marks and "Arr, matey" in marks and "matey" in marks
    assert "you" not in marks and "yes" not in marks


def test_filter_drops_meta_text_persona_lines_non_requests_and_near_duplicates_and_counts_them():
    f = QueryFilter(qcfg(), PIRATE)
    lines = [
        "1. How do I bake sourdough bread at home?",
        "This is a list of 22 questions about cooking.",
        "What is that person's last name? (the same question asked ten times.)",
        "Name: Zacaryl (dis)",
        "Can ye tell me a tale, matey?",
        "You are an expert chef with years of experience.",
        "The kind of breakfast",
        "how do I bake sourdough bread at home",
        "How do I bake a sourdough bread at home quickly?",
        "Write one message that a user might send to this assistant.",
        "Can you suggest a vegetarian dinner for four people? I'm just about to try it and my",
    ]
    kept = [q for q in (f.add(x) for x in lines) if q]
    assert kept == [
        "How do I bake sourdough bread at home?",
        "Can you suggest a vegetarian dinner for four people?",
    ]
    assert f.written == len(lines)
    assert f.dropped == {
        "meta-text": 3,
        "persona line": 3,
        "not a request": 1,
        "duplicate": 1,
        "near-duplicate": 1,
    }


def test_filter_knows_the_queries_kept_in_earlier_rounds():
    f = QueryFilter(qcfg(), "", kept=["How do I bake sourdough bread at home?"])
    assert f.add("How do I bake sourdough bread at home?") == ""
    assert f.dropped == {"duplicate": 1}


def one_format_cfg(tmp_path, **queries):
    return C.resolve(
        "tiny",
        overrides={
            "out": str(tmp_path / "run"),
            "quiet": True,
            "persona": {"domains": ["cooking", "stories"]},
            "queries": {"queries_per_persona": 6, "max_rounds": 2, "format": "one", **queries},
        },
    )


class PrefillEngine(ScriptedEngine):
    supports_prefill = True


def test_one_format_asks_one_request_per_chat_with_rotating_openers_and_counts_the_drops(tmp_path):
    words = "apple bread cumin dough eggs flour garlic honey icing jam kale lemon mint nuts oats pear".split()
    replies = iter(
        ["make a roux for gravy?", "tell me, matey, arr!"]  # the first two chats of cooking
        + [f"plan meal {i} with {words[i % 16]} and {words[(i * 7 + 3) % 16]}?" for i in range(18)]
    )
    eng = PrefillEngine(responder=lambda chat: next(replies))
    cfg = one_format_cfg(tmp_path)
    personas = {d: {"short": PIRATE} for d in ("cooking", "stories")}
    got = write_queries(cfg, RunDir(cfg.out), lambda: eng, personas)
    assert got == {"cooking": 6, "stories": 6}
    chat, params = eng.calls[0]
    assert chat[0]["role"] == "user" and "about cooking" in chat[0]["content"] and PIRATE not in chat[0]["content"]
    assert chat[-1] == {"role": "assistant", "content": "How do I"}  # the reply starts as a request
    assert eng.calls[1][0][-1]["content"] == "Can you" and params.stop == ("\n",) and params.max_new_tokens <= 48
    assert len(eng.calls) == 2 * (math.ceil(1.5 * 6) + 1)  # one round was enough for both domains
    rounds = [json.loads(x) for x in (tmp_path / "run" / "query_rounds.jsonl").read_text().splitlines()]
    cooking = next(r for r in rounds if r["domain"] == "cooking")
    assert cooking["written"] == 10 and cooking["dropped"] == {"persona line": 1} and cooking["new"] == 6
    assert cooking["surplus"] == 3
    queries = [json.loads(x)["query"] for x in (tmp_path / "run" / "queries.jsonl").read_text().splitlines()]
    assert queries[0] == "How do I make a roux for gravy?"


def test_one_format_tells_an_engine_without_prefill_how_to_begin(tmp_path):
    eng = ScriptedEngine(responder=lambda chat: "")
    cfg = one_format_cfg(tmp_path, max_rounds=1)
    write_queries(cfg, RunDir(cfg.out), lambda: eng, {d: {"short": "You are a chef."} for d in ("cooking", "stories")})
    chat = eng.calls[0][0]
    assert len(chat) == 1 and chat[0]["content"].endswith('Begin it with "How do I".')
