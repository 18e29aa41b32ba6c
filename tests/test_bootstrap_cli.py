"""`prism bootstrap` on the command line: one-line user errors, resuming, and (slow) the embedded model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from prism_persona import cli
from prism_persona import config as C


def prism(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "prism_persona.cli", "bootstrap", *args],
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(out, text):
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    err = out.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("prism bootstrap: error:") and text in err, err


@pytest.mark.parametrize("args, text", [
    (["--domains", "writing,writing"], "duplicate domain names: writing"),
    (["--domains", "writing", "--persona-file", "writing=/no/such/persona.txt"], "persona file not found"),
    (["--domains", "writing", "--model", "./no/such/model"], "model path not found"),
    (["--domains", "writing", "--judge", "no_such_judge_module:pick"], "cannot import judge module 'no_such_judge_module'"),
])
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
        (["--domains", "a", "--persona-file", f"a={empty}", "--out", str(tmp_path / "r4")], "persona file for 'a' is empty"),
        (["--domains", "a", "--judge", "os:no_such_fn", "--out", str(tmp_path / "r5")], "has no attribute 'no_such_fn'"),
    ]
    for args, text in cases:
        assert cli.main(["bootstrap", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and text in err, (args, err)


def test_cli_resume_refuses_changed_settings(tmp_path):
    """A run made in-process; the CLI resumes it from RUN/config.json and refuses a changed setting
    before loading any model."""
    from prism_persona.bootstrap.pipeline import run_bootstrap
    from test_bootstrap import Fake

    run = tmp_path / "run"
    cfg = C.resolve("tiny", overrides={"out": str(run), "quiet": True, "persona": {"domains": ["writing"]},
                                       "queries": {"queries_per_persona": 2}})
    run_bootstrap(cfg, engine=Fake())
    out = prism("--out", str(run), "--answer-tokens", "7")
    assert_one_line_error(out, "holds 'answers' records made with other settings (answers.max_new_tokens: 96 -> 7)")
    out = prism("--out", str(run), "--domains", "writing", "--model", "HuggingFaceTB/other-model")
    assert_one_line_error(out, "model: 'smollm2-135m-instruct' -> 'HuggingFaceTB/other-model'")


@pytest.mark.slow
def test_cli_embedded_model_end_to_end(tmp_path):
    """The real embedded SmolLM2-135M on a tiny setting: every file, the summary and the table."""
    run = tmp_path / "run"
    args = ["--preset", "tiny", "--domains", "writing", "--queries-per-persona", "2", "--answer-tokens", "24",
            "--set", "persona.max_new_tokens=48", "--set", "persona.lengths=min,short",
            "--set", "queries.max_new_tokens=120", "--set", "queries.max_rounds=2", "--out", str(run), "-q"]
    out = prism(*args, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("config.json", "personas.jsonl", "queries.jsonl", "answers.jsonl", "verdicts.jsonl",
                 "summary.json", "summary.md"):
        assert (run / name).is_file(), name
    s = json.loads((run / "summary.json").read_text())
    assert s["judge_mode"] == "logprob" and s["model"] == "smollm2-135m-instruct"
    n = s["domains"]["writing"]["queries"]
    assert 1 <= n <= 2 and sum(s["total"][k] for k in ("wins", "losses", "ties", "mixed", "unparseable")) == n
    assert s["tokens"]["total"]["tokens_generated"] > 0 and s["tokens"]["total"]["tokens_per_s"] > 0
    personas = [json.loads(x) for x in (run / "personas.jsonl").read_text().splitlines()]
    assert len(personas) == 2 and all(p["text"].startswith("You") for p in personas)
    assert "| writing" in out.stdout and "flip rate" in out.stdout
    # rerunning the finished run is instant and changes nothing
    before = (run / "verdicts.jsonl").read_text()
    again = prism("--out", str(run), "-q", timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (run / "verdicts.jsonl").read_text() == before
    s2 = json.loads((run / "summary.json").read_text())
    assert s2["tokens"]["this_invocation"]["tokens_generated"] == 0 and s2["tokens"]["total"] == s["tokens"]["total"]
