"""--queries-file: the user's own training queries replace stage 2's generation."""

from __future__ import annotations

import json

import pytest

from prism_persona import config as C
from prism_persona.bootstrap.query_file import check_queries_file, read_queries_file
from prism_persona.cli import main
from prism_persona.errors import ConfigMismatchError, PrismError
from prism_persona.options import merge
from prism_persona.store import RunDir
from prism_persona.testing import BootstrapEngine
from prism_persona.train.pipeline import run_bootstrap

TRICKY = ['What is 2,5 + "3"?', "Line one\nline two of the same query", "Next\u0085line kept", "Para\u2028sep kept"]


def test_formats_are_read_with_real_parsers(tmp_path):
    rows = [{"domain": "writing", "query": q} for q in TRICKY]
    jl = tmp_path / "q.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    js = tmp_path / "q.json"
    js.write_text(json.dumps({"writing": TRICKY}), encoding="utf-8")
    import csv

    cs = tmp_path / "q.csv"
    with open(cs, "w", encoding="utf-8-sig", newline="") as f:  # with a BOM, as Excel writes it
        w = csv.writer(f)
        w.writerow(["Domain", "Query"])
        w.writerows([["writing", q] for q in TRICKY])
    for path in (jl, js, cs):
        assert read_queries_file(path) == [("writing", q) for q in TRICKY], path.name


@pytest.mark.parametrize(
    "name, content, needle",
    [
        ("a.jsonl", '{"domain": "writing", "query": "ok"}\n{broken\n', "line 2 is not valid JSON"),
        ("b.jsonl", '{"query": "no domain here"}\n', "line 1: no 'domain'"),
        ("c.jsonl", '{"domain": "writing", "query": "  "}\n', "no non-empty 'query'"),
        ("d.csv", "topic,text\nwriting,hello\n", "must name a 'domain' and a 'query' column"),
        ("e.json", '"just a string"', "expected a list of objects"),
        ("f.jsonl", "", "holds no queries"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path, name, content, needle):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(PrismError, match=needle) as info:
        read_queries_file(path)
    assert "\n" not in str(info.value)


def test_non_utf8_and_domain_mismatch(tmp_path):
    bad = tmp_path / "latin.jsonl"
    bad.write_bytes('{"domain": "writing", "query": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(PrismError, match="is not UTF-8"):
        read_queries_file(bad)
    ok = tmp_path / "q.jsonl"
    ok.write_text(json.dumps({"domain": "law", "query": "Can I sue?"}) + "\n")
    with pytest.raises(PrismError, match="domains not in --domains: law"):
        check_queries_file(ok, ["writing"])
    with pytest.raises(PrismError, match="no queries for: writing"):
        check_queries_file(ok, ["law", "writing"])


def _cfg(tmp_path, qfile, **over):
    base = {
        "out": str(tmp_path / "run"),
        "quiet": True,
        "persona": {"domains": ["writing", "coding"]},
        "queries": {"queries_per_persona": 3, "queries_file": str(qfile)},
        "model": {"batch_size": 4},
    }
    return C.resolve("tiny", overrides=merge(base, over))


def test_bootstrap_uses_the_file_and_never_asks_for_queries(tmp_path):
    qfile = tmp_path / "q.jsonl"
    rows = [
        ("writing", "Help me start a short story about a lighthouse."),
        ("writing", "HELP me start a short story about a lighthouse."),
        ("coding", "How do I reverse a list in Python?"),
        ("coding", "Why does my loop never end?"),
        ("writing", "Is this sentence passive: the cake was eaten?"),
    ]
    qfile.write_text("".join(json.dumps({"domain": d, "query": q}) + "\n" for d, q in rows))
    engine = BootstrapEngine()
    prompts = []
    original = engine.reply
    engine.reply = lambda chat, params: prompts.append(chat[-1]["content"]) or original(chat, params)
    summary = run_bootstrap(_cfg(tmp_path, qfile), engine=engine)
    assert not any("questions or requests" in p for p in prompts)  # no query generation
    stored = [json.loads(x) for x in (tmp_path / "run" / "queries.jsonl").read_text().splitlines()]
    assert [(r["domain"], r["query"]) for r in stored] == [
        rows[0],
        rows[2],
        rows[3],
        rows[4],
    ]  # the case-duplicate dropped
    assert all(r["source"] == "file" for r in stored)
    assert summary["total"]["wins"] == 4  # the scripted judge prefers every persona answer
    verdicts = (tmp_path / "run" / "verdicts.jsonl").read_text().splitlines()
    assert len(verdicts) == 4
    # resume: nothing is added twice
    run_bootstrap(_cfg(tmp_path, qfile), engine=BootstrapEngine())
    assert len((tmp_path / "run" / "queries.jsonl").read_text().splitlines()) == 4
    # an edited file is noticed and refused
    qfile.write_text(qfile.read_text() + json.dumps({"domain": "coding", "query": "What is a closure?"}) + "\n")
    with pytest.raises(ConfigMismatchError, match="queries"):
        run_bootstrap(_cfg(tmp_path, qfile), engine=BootstrapEngine())
    assert RunDir(tmp_path / "run").done("bootstrap")


def test_config_file_paths_are_relative_to_the_file(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "q.jsonl").write_text(json.dumps({"domain": "writing", "query": "Name a rhyme for orange?"}) + "\n")
    (conf / "poet.txt").write_text("You are a poet.")
    (conf / "my_judge.py").write_text("def judge(q, a, b):\n    return 'A'\n")
    (conf / "run.toml").write_text(
        '[persona]\ndomains = ["writing"]\npersona_files = { writing = "poet.txt" }\n'
        '[queries]\nqueries_file = "q.jsonl"\n[judge]\njudge = "my_judge.py:judge"\n'
    )
    monkeypatch.chdir(tmp_path / "..")
    cfg = C.resolve("tiny", file=conf / "run.toml")
    assert cfg.queries.queries_file == str((conf / "q.jsonl").resolve())
    assert cfg.persona.persona_files == {"writing": str((conf / "poet.txt").resolve())}
    assert cfg.judge.judge == f"{(conf / 'my_judge.py').resolve()}:judge"


def test_cli_refuses_a_bad_queries_file_before_loading_a_model(tmp_path, capsys, monkeypatch):
    import prism_persona.models as M

    monkeypatch.setattr(M, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"domain": "law", "query": "Can I sue?"}) + "\n")
    rc = main(["bootstrap", "--domains", "writing", "--queries-file", str(qfile), "--out", str(tmp_path / "r"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "domains not in --domains: law" in err[0]
