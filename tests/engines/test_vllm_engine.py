"""The managed vLLM server and the vLLM engine, against a stand-in ``vllm`` module (fast; no vLLM).

tests/fixtures/fake_vllm holds a module at vllm.entrypoints.openai.api_server that speaks the bits of
vLLM's HTTP API PRISM uses; the server's life cycle (start, health wait, log, stop, no orphan when
PRISM is killed) and the engine's requests are real. tests/integration runs the same against vLLM.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import prism_persona
from prism_persona.engines.base import SamplingParams
from prism_persona.engines.vllm import VLLMError, VLLMServer, find_vllm_python
from prism_persona.errors import PrismError

SRC = Path(prism_persona.__file__).resolve().parents[1]


def gone(pid: int, wait_s: float = 10.0) -> bool:
    """True once ``pid`` no longer runs (a zombie counts as gone: nobody may reap it here)."""
    deadline = time.time() + wait_s
    while time.time() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.1)
    return False


def test_server_starts_logs_and_stops(fake_python, tmp_path):
    log = tmp_path / "run" / "logs" / "vllm.log"
    srv = VLLMServer(
        "/models/m",
        "m",
        fake_python,
        log,
        loras={"prism": "/a"},
        dtype="float32",
        cpu_cores="0-1",
        kv_cache_gib=2,
        quiet=True,
    )
    with srv:
        assert srv.alive() and srv.startup_seconds is not None
        pid = srv.proc.pid
        text = log.read_text()
        assert "prism starts vLLM" in text and "--enable-lora" in text and "prism=/a" in text
        assert "--enforce-eager" in text and "--dtype float32" in text
        assert "OMP_NUM_THREADS=2 BIND=0-1" in text  # the CPU cores setting reaches vLLM
    assert srv.proc is None and gone(pid)
    srv.stop()  # idempotent


def test_start_up_failure_is_one_line_with_the_reason(fake_python, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_EXIT", "3")
    srv = VLLMServer("m", "m", fake_python, tmp_path / "vllm.log", quiet=True)
    with pytest.raises(VLLMError, match=r"exited with code 3 while starting: ValueError: fake start-up failure"):
        srv.start()
    assert srv.proc is None


def test_start_up_timeout_stops_the_server(fake_python, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_DELAY", "30")
    srv = VLLMServer("m", "m", fake_python, tmp_path / "vllm.log", quiet=True, startup_timeout_s=1.5)
    with pytest.raises(VLLMError, match="did not become healthy within 2 s"):
        srv.start()
    assert srv.proc is None


PARENT = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background shell starts us with SIGINT ignored
from prism_persona.engines.vllm import VLLMServer
srv = VLLMServer("m", "m", sys.argv[1], sys.argv[2], quiet=True).start()
print(srv.proc.pid, flush=True)
with srv:
    time.sleep(120)
"""


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_no_orphan_server_when_prism_is_killed_or_interrupted(fake_python, tmp_path, how):
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, fake_python, str(tmp_path / "vllm.log")],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        server_pid = int(parent.stdout.readline())
        assert not gone(server_pid, 0.2)
        parent.send_signal(how)
        parent.wait(30)
        assert gone(server_pid), f"the vLLM server outlived PRISM after signal {how!r}"
    finally:
        if parent.poll() is None:
            parent.kill()


def test_finding_vllm(tmp_path, monkeypatch):
    monkeypatch.delenv("PRISM_VLLM_PYTHON", raising=False)
    with pytest.raises(PrismError, match="not an executable"):
        find_vllm_python(str(tmp_path / "missing-python"))
    monkeypatch.setenv("PRISM_VLLM_VENV", str(tmp_path / "no-venv"))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(PrismError, match="scripts/setup_vllm.sh"):
        find_vllm_python()
    venv_python = tmp_path / "venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text("#!/bin/sh\n")
    venv_python.chmod(0o755)
    monkeypatch.setenv("PRISM_VLLM_VENV", str(tmp_path / "venv"))
    assert find_vllm_python() == str(venv_python)


def sent(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]


def test_engine_sends_the_hf_engines_token_ids(fake_engine, tmp_path):
    from prism_persona.models import render_chat

    tok = fake_engine.tokenizer
    chats = [
        [{"role": "system", "content": "You are a poet."}, {"role": "user", "content": "rain?"}],
        [{"role": "user", "content": "hi"}],
    ]
    outs = fake_engine.generate(chats, SamplingParams(max_new_tokens=7, temperature=0.7, top_p=0.9, seed=3))
    expected = [tok(render_chat(tok, c), add_special_tokens=False)["input_ids"] for c in chats]
    assert [o.text for o in outs] == [f"tiny:{len(ids)} tokens" for ids in expected]
    bodies = sorted(sent(tmp_path), key=lambda b: len(b["prompt"]), reverse=True)
    assert [b["prompt"] for b in bodies] == sorted(expected, key=len, reverse=True)
    assert all(b["max_tokens"] == 7 and b["seed"] == 3 and b["top_p"] == 0.9 for b in bodies)
    assert bodies[0]["stop_token_ids"] == [tok.eos_token_id]
    lora = fake_engine.generate(chats[:1], SamplingParams(max_new_tokens=2), model="prism")
    assert lora[0].text.startswith("prism:")


def test_engine_scores_like_the_hf_engine(fake_engine, tmp_path):
    from prism_persona.engines.hf import HFEngine

    chat = [{"role": "user", "content": "A or B?"}]
    scores = fake_engine.score_choices([chat, chat], ["A", "B"])
    assert scores[0] == scores[1]
    fake_lp = lambda t: -0.25 - (t % 7)  # noqa: E731  (the stand-in's log-prob of token t)
    hf = HFEngine.__new__(HFEngine)
    hf.tokenizer = fake_engine.tokenizer
    for choice in ("A", "B"):
        ids = hf.choice_token_ids(choice)  # the HF engine's spellings: with and without a leading space
        want = math.log(sum(math.exp(fake_lp(t)) for t in ids))
        assert scores[0][choice] == pytest.approx(want)
    bodies = sent(tmp_path)
    assert all(b["max_tokens"] == 1 and len(b["allowed_token_ids"]) == 1 and b["logprobs"] == 0 for b in bodies)
    asked = sorted(b["allowed_token_ids"][0] for b in bodies)
    assert asked == sorted(2 * list({t for c in "AB" for t in hf.choice_token_ids(c)}))  # each spelling once per chat


def test_engine_reports_a_server_that_went_away(fake_engine):
    os.killpg(fake_engine.server.proc.pid, signal.SIGKILL)
    fake_engine.server.proc.wait(10)
    fake_engine.max_retries = 0
    with pytest.raises(VLLMError, match="went away.*rerun to resume"):
        fake_engine.generate([[{"role": "user", "content": "hi"}]], SamplingParams(max_new_tokens=2))


@pytest.mark.subprocess
def test_bootstrap_engine_vllm_without_vllm_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PRISM_VLLM_VENV", str(tmp_path / "no-venv"))
    monkeypatch.delenv("PRISM_VLLM_PYTHON", raising=False)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "prism_persona.cli",
            "bootstrap",
            "--domains",
            "a,b",
            "--engine",
            "vllm",
            "--out",
            str(tmp_path / "run"),
            "--vllm-python",
            str(tmp_path / "nope"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--vllm-python" in proc.stderr and "not an executable" in proc.stderr
