"""`prism eval` / `prism study` on a server: --engine vllm (a managed server, here the stand-in vLLM of
tests/fixtures/fake_vllm; tests/integration runs the real one) and --engine openai --base-url."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prism_persona.cli import main
from prism_persona.testing import FakeOpenAIServer, vllm_server_pids

FIX = Path(__file__).resolve().parents[1] / "fixtures"


def _requests(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_engine_vllm_routes_each_row_like_the_in_process_gate(tmp_path, monkeypatch, tiny_model_dir, fake_python):
    from prism_persona.gated.model import GatedModel
    from prism_persona.models import load_tokenizer, render_chat
    from prism_persona.testing import make_tiny_artifact

    art = make_tiny_artifact(
        tiny_model_dir,
        tmp_path / "run" / "prism",
        target_modules=("q_proj", "v_proj"),
        cache=False,
        queries=("Write a haiku about rain.", "What is 12 * 12?", "hello"),
    )
    monkeypatch.setenv("PRISM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FAKE_VLLM_REQUESTS", str(tmp_path / "requests.jsonl"))
    out = tmp_path / "ev"
    args = [
        "eval",
        "--prism",
        str(art),
        "--systems",
        "base,lora,prism,oracle",
        "--engine",
        "vllm",
        "--vllm-python",
        fake_python,
        "--benchmarks",
        "mmlu,pku",
        "--mmlu",
        str(FIX / "mmlu_hf.jsonl"),
        "--pku",
        str(FIX / "pku_small.json"),
        "--refusal-classifier",
        "string",
        "--limit",
        "4",
        "--safety-tokens",
        "3",
        "--resamples",
        "20",
        "--out",
        str(out),
        "-q",
    ]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["systems"] == ["base", "lora", "prism", "oracle"]
    log = (out / "logs" / "vllm.log").read_text()
    assert "--enable-lora" in log and "prism=" in log  # the artifact's exported adapter is served
    recs = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    pku = {(r["system"], r["item_id"]): r for r in recs if r["bench"] == "pku"}
    tok = load_tokenizer(str(tiny_model_dir))
    gm = GatedModel.from_pretrained(art, device="cpu", dtype="float32")
    by_prompt = {
        tuple(b["prompt"]): b["model"] for b in _requests(tmp_path / "requests.jsonl") if "allowed_token_ids" not in b
    }
    from prism_persona.evals.benchmarks.safety import load_safety

    items = load_safety("pku", str(FIX / "pku_small.json"), limit=4)
    for it in items:
        chat = [{"role": "user", "content": it.prompt}]
        ((prob, routed),) = gm.route([chat])
        rec = pku[("prism", it.item_id)]
        meta = {k: rec["meta"][k] for k in ("routed", "gate_prob")}
        assert meta == {"routed": routed, "gate_prob": pytest.approx(prob, abs=1e-5)}
        # the binary artifact's unnamed adapter: a routed answer names no persona (its probability is the gate's)
        assert rec["meta"].get("persona") is None
        ids = tuple(tok(render_chat(tok, chat), add_special_tokens=False)["input_ids"])
        base_name = str(tiny_model_dir)  # the base is served under its display name (the local path)
        assert pku[("base", it.item_id)]["response"] == f"{base_name}:{len(ids)} tokens"
        assert pku[("lora", it.item_id)]["response"] == f"prism:{len(ids)} tokens"
        assert rec["response"] == f"{'prism' if routed else base_name}:{len(ids)} tokens"
        assert by_prompt[ids] in ("prism", base_name)
    assert res["mmlu"]["prism"]["routing"]["all"]["n"] == 4  # MMLU routing through RoutedEngine.route
    mmlu = [r for r in recs if r["bench"] == "mmlu"]
    assert {r["method"] for r in mmlu} == {"logprob"}  # exact first-token log-probs from the server
    gm.close()
    assert not vllm_server_pids(str(tiny_model_dir))  # the server PRISM started is gone
    before = log.count("prism starts vLLM")
    assert main(args) == 0  # a rerun answers from the cache without starting a server
    assert (out / "logs" / "vllm.log").read_text().count("prism starts vLLM") == before


def test_eval_engine_openai_sends_base_and_persona_to_the_server(tmp_path):
    with FakeOpenAIServer(
        reply=lambda body: "[[7]]" if "Rating" in str(body) or "rating" in str(body) else "an answer"
    ) as srv:
        out = tmp_path / "ev"
        assert (
            main(
                [
                    "eval",
                    "--engine",
                    "openai",
                    "--base-url",
                    srv.url,
                    "--model",
                    "served-m",
                    "--systems",
                    "base,persona",
                    "--benchmarks",
                    "mtbench",
                    "--mtbench",
                    str(FIX / "mtbench_small.jsonl"),
                    "--limit",
                    "2",
                    "--answer-tokens",
                    "5",
                    "--no-pairwise",
                    "--judge-mode",
                    "text",
                    "--resamples",
                    "20",
                    "--out",
                    str(out),
                    "-q",
                ]
            )
            == 0
        )
        bodies = list(srv.bodies)
    assert bodies and {b["model"] for b in bodies} == {"served-m"}
    systems = [b["messages"][0]["content"] for b in bodies if b["messages"][0]["role"] == "system"]
    assert any("expert" in s for s in systems)  # the persona system's prompts carry the persona
    res = json.loads((out / "results.json").read_text())
    assert res["mtbench"]["base"]["score"]["mean"] == 7.0
    recs = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert {r["system"] for r in recs} == {"base", "persona"}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--engine", "openai"], "--engine openai needs --base-url"),
        (["--base-url", "http://127.0.0.1:9/v1"], "--base-url needs --engine vllm or --engine openai"),
        (
            ["--engine", "openai", "--base-url", "http://127.0.0.1:9/v1", "--prism", "x"],
            "--engine openai runs base/persona",
        ),
        (["--engine", "openai", "--base-url", "http://127.0.0.1:9/v1"], "--engine openai needs --model"),
        (["--vllm-args=--enforce-eager"], "--vllm-python/--vllm-args need --engine vllm"),
        (["--engine", "vllm", "--base-url", "ftp://x"], "--base-url must be an http(s) URL"),
    ],
)
def test_engine_flag_mistakes_are_one_line_errors(tmp_path, capsys, flags, message):
    assert (
        main(
            [
                "eval",
                "--benchmarks",
                "mmlu",
                "--mmlu",
                str(FIX / "mmlu_hf.jsonl"),
                "--out",
                str(tmp_path / "e"),
                "-q",
                *flags,
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"prism eval: error: {message}") and "\n" not in err
    assert not (tmp_path / "e").exists()  # refused before anything was written


def test_eval_engine_vllm_with_another_model_than_the_artifacts_is_refused(
    tmp_path, capsys, tiny_model_dir, tiny_qwen_dir, fake_python
):
    from prism_persona.testing import make_tiny_artifact

    art = make_tiny_artifact(tiny_model_dir, tmp_path / "run" / "prism", cache=False)
    assert (
        main(
            [
                "eval",
                "--prism",
                str(art),
                "--model",
                str(tiny_qwen_dir),
                "--engine",
                "vllm",
                "--vllm-python",
                fake_python,
                "--benchmarks",
                "mmlu",
                "--mmlu",
                str(FIX / "mmlu_hf.jsonl"),
                "--out",
                str(tmp_path / "e"),
                "-q",
            ]
        )
        == 2
    )
    assert "drop --model" in capsys.readouterr().err


def test_study_engine_vllm_starts_and_stops_its_server(tmp_path, monkeypatch, tiny_model_dir, fake_python):
    monkeypatch.setenv("PRISM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "st"
    assert (
        main(
            [
                "study",
                "--model",
                str(tiny_model_dir),
                "--engine",
                "vllm",
                "--vllm-python",
                fake_python,
                "--benchmarks",
                "pku",
                "--pku",
                str(FIX / "pku_small.json"),
                "--refusal-classifier",
                "string",
                "--limit",
                "2",
                "--safety-tokens",
                "3",
                "--resamples",
                "20",
                "--out",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    recs = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert recs and all(r["response"].endswith(" tokens") for r in recs)  # the stand-in server's answers
    assert "prism starts vLLM" in (out / "logs" / "vllm.log").read_text()


def test_study_with_an_artifact_routes_on_the_vllm_server(tmp_path, monkeypatch, tiny_model_dir, fake_python):
    from prism_persona.testing import make_tiny_artifact

    art = make_tiny_artifact(tiny_model_dir, tmp_path / "run" / "prism", cache=False)
    monkeypatch.setenv("PRISM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "st"
    assert (
        main(
            [
                "study",
                "--prism",
                str(art),
                "--engine",
                "vllm",
                "--vllm-python",
                fake_python,
                "--benchmarks",
                "pku",
                "--pku",
                str(FIX / "pku_small.json"),
                "--refusal-classifier",
                "string",
                "--limit",
                "2",
                "--safety-tokens",
                "3",
                "--resamples",
                "20",
                "--out",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    recs = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    prism_rows = [r for r in recs if r["system"] == "prism"]
    assert prism_rows and all(
        r["response"].startswith("prism:" if r["meta"]["routed"] else str(tiny_model_dir)) for r in prism_rows
    )
    assert all(r["response"].startswith("prism:") for r in recs if r["system"] == "lora")


def test_attaching_to_a_vllm_without_the_adapter_is_one_line(tmp_path, capsys, tiny_model_dir, fake_python):
    from prism_persona.engines.vllm import VLLMServer
    from prism_persona.testing import make_tiny_artifact

    art = make_tiny_artifact(tiny_model_dir, tmp_path / "run" / "prism", cache=False)
    with VLLMServer(str(tiny_model_dir), "tiny", fake_python, tmp_path / "vllm.log", quiet=True) as srv:
        rc = main(
            [
                "eval",
                "--prism",
                str(art),
                "--systems",
                "base,lora",
                "--engine",
                "vllm",
                "--base-url",
                srv.base_url,
                "--benchmarks",
                "pku",
                "--pku",
                str(FIX / "pku_small.json"),
                "--refusal-classifier",
                "string",
                "--limit",
                "2",
                "--out",
                str(tmp_path / "e"),
                "-q",
            ]
        )
    err = [x for x in capsys.readouterr().err.strip().splitlines() if x.strip()]
    assert rc == 2 and len(err) == 1 and "does not serve the adapter 'prism'" in err[0], err
