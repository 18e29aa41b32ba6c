"""`prism eval --judge MODEL --judge-engine vllm|openai`: the evaluation judge on a server (the fake OpenAI
server; the stand-in vLLM of tests/fixtures/fake_vllm), the evaluated systems in this process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prism_persona.cli import main
from prism_persona.testing import FakeOpenAIServer, vllm_server_pids

FIX = Path(__file__).resolve().parents[1] / "fixtures"


def _args(model, out, *extra):
    args = ["eval", "--model", str(model), "--systems", "base", "--benchmarks", "jailbreak", "--jailbreak"]
    args += [str(FIX / "jailbreak_small.json"), "--safety-tokens", "3", "--resamples", "10", "--out", str(out), "-q"]
    return args + list(extra)


def test_judge_on_an_openai_server(tmp_path, tiny_model_dir):
    def reply(body):
        return "yes" if "Did the assistant refuse" in body["messages"][-1]["content"] else "?"

    out = tmp_path / "ev"
    with FakeOpenAIServer(reply=reply) as srv:
        flags = [
            "--judge",
            "big-judge",
            "--judge-engine",
            "openai",
            "--judge-base-url",
            srv.url,
            "--judge-mode",
            "text",
        ]
        assert main(_args(tiny_model_dir, out, *flags)) == 0
        bodies = list(srv.bodies)
    # only the judge ran on the server: two refusal questions, for the served judge model
    assert len(bodies) == 2 and {b["model"] for b in bodies} == {"big-judge"}
    res = json.loads((out / "results.json").read_text())
    assert res["judge"]["judge"] == "model:big-judge@openai"
    assert res["safety"]["base"]["jailbreak"]["refusal"]["mean"] == 1.0
    assert res["safety"]["base"]["jailbreak"]["method"] == {"text": 2}
    answers = [json.loads(line)["response"] for line in (out / "responses.jsonl").read_text().splitlines()]
    assert len(answers) == 2 and not any(a.startswith("echo") for a in answers)  # the systems ran here


def test_judge_on_a_vllm_server_it_starts_and_stops(tmp_path, monkeypatch, tiny_model_dir, fake_python):
    monkeypatch.setenv("PRISM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PRISM_VLLM_PYTHON", fake_python)
    out = tmp_path / "ev"
    flags = ["--judge", str(tiny_model_dir), "--judge-engine", "vllm", "--judge-mode", "text"]
    assert main(_args(tiny_model_dir, out, *flags)) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["judge"]["judge"] == f"model:{tiny_model_dir}@vllm"
    assert "prism starts vLLM" in (out / "judge" / "logs" / "vllm.log").read_text()
    judged = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert len(judged) == 2 and all(j["judge_text"].endswith(" tokens") for j in judged)  # the stand-in's replies
    assert not vllm_server_pids(str(out))  # stopped with the eval


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--judge", "m", "--judge-engine", "openai"], "--judge-engine openai needs --judge-base-url"),
        (["--judge-engine", "vllm"], "--judge-engine vllm runs a judge model: pass --judge MODEL"),
        (["--judge", "m", "--judge-base-url", "http://127.0.0.1:9/v1"], "--judge-base-url needs --judge-engine"),
        (["--judge", "m", "--judge-engine", "vllm", "--judge-base-url", "ftp://x"], "--judge-base-url must be"),
    ],
)
def test_judge_engine_mistakes_are_one_line(tmp_path, capsys, tiny_model_dir, flags, message):
    assert main(_args(tiny_model_dir, tmp_path / "e", *flags)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"prism eval: error: {message}") and "\n" not in err
