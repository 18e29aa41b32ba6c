"""`prism serve` as a process: a real tiny artifact, API key from the environment, SIGTERM shutdown."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from prism_persona.testing import make_tiny_artifact


def _reader(stream, q):
    for line in iter(stream.readline, ""):
        q.put(line)
    q.put(None)


@pytest.mark.subprocess
def test_serve_process_end_to_end_and_sigterm(tiny_model_dir, tmp_path):
    from openai import AuthenticationError, OpenAI

    art = make_tiny_artifact(tiny_model_dir, tmp_path / "prism")
    env = {**os.environ, "PRISM_API_KEY": "k3y", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prism_persona.cli",
            "serve",
            "--prism",
            str(art),
            "--port",
            "0",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--max-tokens",
            "16",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stderr, lines), daemon=True).start()
    try:
        url, seen = None, []
        while url is None:
            line = lines.get(timeout=90)
            assert line is not None, "server exited early:\n" + "".join(seen)
            seen.append(line)
            m = re.search(r"listening on (http://127\.0\.0\.1:\d+/v1)", line)
            url = m.group(1) if m else None
        client = OpenAI(base_url=url, api_key="k3y", max_retries=0, timeout=60)
        results: dict = {}

        def slow():
            results["r"] = client.chat.completions.create(
                model="prism", messages=[{"role": "user", "content": "as an expert, explain tides"}], max_tokens=500
            )

        resp = client.chat.completions.create(model="prism", messages=[{"role": "user", "content": "hi"}])
        prism = resp.model_extra["prism"]
        assert set(prism) == {"routed", "gate_prob", "persona", "persona_prob"} and resp.usage.completion_tokens <= 16
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        t = threading.Thread(target=slow)
        t.start()
        time.sleep(0.3)  # let the request reach the server before the signal
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert results["r"].choices[0].message.content is not None  # sent before SIGTERM: answered
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_serve_flag_validation(tmp_path, capsys):
    from prism_persona.cli import main

    assert main(["serve", "--prism", str(tmp_path), "--route-only", "--upstream", "http://127.0.0.1:1/v1"]) == 2
    assert "--base-name" in capsys.readouterr().err
    assert main(["serve", "--prism", str(tmp_path), "--upstream", "http://127.0.0.1:1/v1"]) == 2
    assert main(["serve", "--prism", str(tmp_path), "--port", "0"]) == 2
    assert "not a PRISM artifact" in capsys.readouterr().err
