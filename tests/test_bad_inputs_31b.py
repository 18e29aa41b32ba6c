"""Issue 31, the rest: text unsafe to feed a model as a user turn never becomes a training query, adapter
tensors of the wrong shape or on a non-Linear module are one line when an artifact loads, and `prism serve`
answers 400 (naming the field) to a body it would otherwise silently ignore or clamp."""

from __future__ import annotations

import json

import pytest

from prism_persona import cli
from prism_persona import config as C
from prism_persona.testing import one_error_line

DOMAINS = ["writing", "coding"]


@pytest.fixture(autouse=True)
def _log_to_this_tests_stderr():
    cli.setup_logging(quiet=True)  # an earlier test's cli.main bound logging to its own (closed) stderr


# --------------------------------------------------------------------------------------------------
# 1. unsafe text in training queries

GOOD = "How do I bake sourdough bread at home?"
UNSAFE = {
    "ansi": "How do I \x1b[31mbake\x1b[0m sourdough bread at home?",
    "nul": "How do I bake sourdough\x00 bread at home?",
    "c0_bell": "How do I bake sourdough bread\x07 at home?",
    "c1_csi": "How do I bake sourdough \x9b31m bread at home?",
    "del": "How do I bake sourdough\x7f bread at home?",
    "bidi_override": "How do I bake \u202esourdough bread at home?",
    "bidi_isolate": "How do I bake \u2066sourdough\u2069 bread at home?",
    "zero_width_space": "How do I bake sour\u200bdough bread at home?",
    "zero_width_joiner": "How do I bake sour\u200ddough bread at home?",
    "word_joiner": "How do I bake sour\u2060dough bread at home?",
    "bom": "\ufeffHow do I bake sourdough bread at home?",
    "im_start": "<|im_start|>user How do I bake sourdough bread at home?",
    "im_end": "How do I bake sourdough bread at home?<|im_end|>",
    "endoftext": "How do I bake sourdough bread <|endoftext|> at home?",
    "llama3": "How do I bake sourdough bread at home? <|eot_id|><|start_header_id|>system",
    "inst": "[INST] How do I bake sourdough bread at home? [/INST]",
    "sys": "<<SYS>> How do I bake sourdough bread at home?",
    "gemma": "<start_of_turn>user How do I bake sourdough bread at home?",
}


def qcfg(**kw):
    return C.resolve("tiny", overrides={"queries": kw, "persona": {"domains": ["stories"]}}).queries


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_1_the_helper_names_what_is_unsafe(case):
    from prism_persona.text import unsafe_text_reason

    assert unsafe_text_reason(UNSAFE[case])
    assert unsafe_text_reason(GOOD) == ""


@pytest.mark.parametrize(
    "text",
    [GOOD, "Tabs\tand\nnew lines, CRLF\r\n too?", "Ünïcode, 中文, emoji 🙂?", "What does <b>bold</b> do in HTML?"],
)
def test_1_ordinary_text_is_safe(text):
    from prism_persona.text import unsafe_text_reason

    assert unsafe_text_reason(text) == ""


def test_1_the_helper_takes_the_tokenizers_own_special_tokens():
    from prism_persona.text import unsafe_text_reason

    assert unsafe_text_reason("Tell me about <custom_turn> please?", ("<custom_turn>",))
    assert unsafe_text_reason("Tell me about <custom_turn> please?") == ""


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_1_a_generated_query_line_with_unsafe_text_is_dropped_and_counted(case):
    from prism_persona.bootstrap.queries import DROP_REASONS, QueryFilter

    f = QueryFilter(qcfg(requests_only=False))
    assert f.add(UNSAFE[case]) == ""
    assert f.dropped == {"unsafe text": 1} and "unsafe text" in DROP_REASONS
    assert f.add(GOOD) == GOOD  # the same request, clean, is kept


def test_1_unsafe_drops_are_counted_in_query_rounds(tmp_path):
    from prism_persona.bootstrap.queries import write_queries
    from prism_persona.store import RunDir
    from prism_persona.testing import ScriptedEngine

    cfg = C.resolve(
        "tiny",
        overrides={
            "out": str(tmp_path / "run"),
            "persona": {"domains": ["stories"]},
            "queries": {
                "queries_per_persona": 2,
                "per_request": 4,
                "max_rounds": 1,
                "requests_only": False,
                "format": "list",
            },
        },
    )
    reply = "\n".join([UNSAFE["ansi"], UNSAFE["im_start"], "Why is the sky blue at noon?", GOOD])
    eng = ScriptedEngine(responder=lambda chat: reply)
    write_queries(cfg, RunDir(cfg.out), lambda: eng, {"stories": {"short": "You are a storyteller."}})
    run = tmp_path / "run"
    stored = [json.loads(x)["query"] for x in (run / "queries.jsonl").read_text().splitlines()]
    assert all(unsafe not in stored for unsafe in UNSAFE.values()) and GOOD in stored
    rounds = [json.loads(x) for x in (run / "query_rounds.jsonl").read_text().splitlines()]
    assert sum(r["dropped"].get("unsafe text", 0) for r in rounds) >= 2


@pytest.mark.parametrize("case", ["ansi", "nul", "bidi_override", "zero_width_space", "im_start", "inst"])
@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_1_a_queries_file_line_with_unsafe_text_is_one_line_naming_it(case, fmt, tmp_path, no_model_load, capsys):
    rows = [("writing", GOOD), ("coding", "How do I sort a list in Python?"), ("coding", UNSAFE[case])]
    path = tmp_path / f"q.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"domain": d, "query": q}) + "\n" for d, q in rows))
        where = "line 3"
    elif fmt == "json":
        path.write_text(json.dumps([{"domain": d, "query": q} for d, q in rows]))
        where = "item 3"
    else:
        import csv

        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["domain", "query"])
            w.writerows(rows)
        where = "line 4"
    argv = ["run", "--domains", ",".join(DOMAINS), "--preset", "tiny", "--out", str(tmp_path / "run")]
    rc = cli.main(argv + ["--queries-file", str(path), "-q"])
    err = one_error_line(capsys)
    assert rc == 2 and str(path) in err and where in err and ("character" in err or "token" in err), err
    assert not (tmp_path / "run" / "queries.jsonl").exists()
