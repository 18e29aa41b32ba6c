"""`prism generate` and `prism chat` with --engine vllm (the stand-in vLLM of tests/fixtures/fake_vllm;
tests/integration runs the real server) and --engine openai (testing.FakeOpenAIServer)."""

from __future__ import annotations

import io
import json
import sys

import pytest

from prism_persona import cli
from prism_persona.testing import FakeOpenAIServer


@pytest.fixture
def artifact(tmp_path, tiny_model_dir):
    from prism_persona.testing import make_tiny_artifact

    return make_tiny_artifact(tiny_model_dir, tmp_path / "run" / "prism", cache=False)


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "as an expert, explain tides"},
        {"prompt": "hi"},
        {"id": 7, "prompt": "fix my code"},
        {
            "messages": [
                {"role": "user", "content": "write a poem"},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "shorter"},
            ]
        },
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_generate_engine_vllm_routes_each_row_like_the_in_process_model(
    tmp_path, monkeypatch, artifact, prompts, tiny_model_dir, fake_python
):
    from prism_persona.gated.model import GatedModel

    monkeypatch.setenv("PRISM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out.jsonl"
    assert (
        cli.main(
            [
                "generate",
                "--prism",
                str(artifact),
                "--engine",
                "vllm",
                "--vllm-python",
                fake_python,
                "--input",
                str(prompts),
                "--output",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[2]["id"] == 7 and len(rows) == 4
    gm = GatedModel.from_pretrained(artifact, device="cpu", dtype="float32")
    chats = [[{"role": "user", "content": r["prompt"]}] if "prompt" in r else r["messages"] for r in rows]
    for row, (prob, routed) in zip(rows, gm.route(chats)):
        assert row["routed"] == routed and row["gate_prob"] == pytest.approx(prob, abs=1e-5)
        served = "prism" if routed else str(tiny_model_dir)  # the LoRA or the base, by name on the server
        assert row["response"].startswith(served + ":")
    gm.close()
    assert "prism starts vLLM" in (tmp_path / "logs" / "vllm.log").read_text()
    off = tmp_path / "off.jsonl"
    assert (
        cli.main(
            [
                "generate",
                "--prism",
                str(artifact),
                "--engine",
                "vllm",
                "--vllm-python",
                fake_python,
                "--force",
                "off",
                "--input",
                str(prompts),
                "--output",
                str(off),
                "-q",
            ]
        )
        == 0
    )
    assert all(
        not json.loads(line)["routed"] and json.loads(line)["response"].startswith(str(tiny_model_dir))
        for line in off.read_text().splitlines()
    )


def test_generate_a_base_model_on_an_openai_server(tmp_path, prompts):
    out = tmp_path / "out.jsonl"
    with FakeOpenAIServer() as srv:
        assert (
            cli.main(
                [
                    "generate",
                    "--engine",
                    "openai",
                    "--base-url",
                    srv.url,
                    "--model",
                    "served-m",
                    "--input",
                    str(prompts),
                    "--output",
                    str(out),
                    "-q",
                ]
            )
            == 0
        )
        assert {b["model"] for b in srv.bodies} == {"served-m"} and len(srv.bodies) == 4
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["response"] for r in rows] == [
        "echo as an expert, explain tides",
        "echo hi",
        "echo fix my code",
        "echo shorter",
    ]
    assert all(r["routed"] is False and r["gate_prob"] is None for r in rows)


def test_chat_engine_vllm_keeps_the_first_turns_routing(tmp_path, monkeypatch, artifact, fake_python, capsys):
    from prism_persona.gated.model import GatedModel

    monkeypatch.setenv("PRISM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "stdin", io.StringIO("as an expert, explain tides\nand more\n/quit\n"))
    assert (
        cli.main(
            [
                "chat",
                "--prism",
                str(artifact),
                "--engine",
                "vllm",
                "--vllm-python",
                fake_python,
                "--max-new-tokens",
                "4",
                "-q",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    gm = GatedModel.from_pretrained(artifact, device="cpu", dtype="float32")
    ((prob, routed),) = gm.route([[{"role": "user", "content": "as an expert, explain tides"}]])
    gm.close()
    assert f"persona LoRA {'ON' if routed else 'off'} (gate p={prob:.2f})" in out
    replies = [line for line in out.splitlines() if line.startswith("prism> ")]
    assert len(replies) == 2 and len({r.split(":")[0] for r in replies}) == 1  # one model for the conversation


def test_chat_a_base_model_on_an_openai_server(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/quit\n"))
    with FakeOpenAIServer() as srv:
        assert cli.main(["chat", "--engine", "openai", "--base-url", srv.url, "--model", "m", "-q"]) == 0
    out = capsys.readouterr().out
    assert "[base model: no PRISM gate]" in out and "prism> echo hello" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--input", "{P}", "--output", "{T}/o.jsonl"], "--prism ART is required"),
        (
            ["generate", "--prism", "{A}", "--model", "m", "--input", "{P}", "--output", "{T}/o.jsonl"],
            "--model needs --engine vllm or --engine openai",
        ),
        (
            ["generate", "--engine", "openai", "--model", "m", "--input", "{P}", "--output", "{T}/o.jsonl"],
            "--engine openai needs --base-url",
        ),
        (
            [
                "generate",
                "--engine",
                "openai",
                "--base-url",
                "http://127.0.0.1:9/v1",
                "--prism",
                "{A}",
                "--input",
                "{P}",
                "--output",
                "{T}/o.jsonl",
            ],
            "--engine openai runs a base model only",
        ),
        (
            ["generate", "--engine", "vllm", "--force", "on", "--input", "{P}", "--output", "{T}/o.jsonl"],
            "--force needs --prism",
        ),
        (["chat", "--engine", "openai", "--base-url", "http://127.0.0.1:9/v1"], "--engine openai needs --model"),
        (["chat", "--engine", "vllm", "--base-url", "nope"], "--base-url must be an http(s) URL"),
    ],
)
def test_engine_flag_mistakes_are_one_line(tmp_path, prompts, artifact, capsys, argv, message):
    rc = cli.main([a.format(P=prompts, T=tmp_path, A=artifact) for a in argv])
    err = [x for x in capsys.readouterr().err.strip().splitlines() if x.strip()]
    assert rc == 2 and len(err) == 1 and message in err[0], err
