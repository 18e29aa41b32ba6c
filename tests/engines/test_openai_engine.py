"""The OpenAI-compatible engine: retries, errors, concurrency against a scripted server on 127.0.0.1,
and end to end against `prism serve` with a real tiny gated artifact (generation + log-prob scoring)."""

from __future__ import annotations

import time

import pytest

from prism_persona.engines.base import SamplingParams
from prism_persona.engines.openai import OpenAIEngine, OpenAIEngineError
from prism_persona.testing import FakeOpenAIServer

USER = [{"role": "user", "content": "hello"}]


@pytest.fixture
def server_factory():
    made = []

    def make(*args, **kw):
        made.append(FakeOpenAIServer(*args, **kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


def engine(url, **kw):
    kw.setdefault("backoff_s", 0.01)
    return OpenAIEngine(url, "served-model", **kw)


def err(status, msg="nope"):
    return status, {"error": {"message": msg, "type": "x", "param": None, "code": None}}


def test_generate_passes_params_and_retries_transient_errors(server_factory):
    srv = server_factory([err(429), err(503)])
    eng = engine(srv.url, api_key="k", max_retries=3)
    out = eng.generate([USER], SamplingParams(max_new_tokens=7, temperature=0.7, top_p=0.9, seed=5, stop=("###",)))
    assert out[0].text == "echo hello" and out[0].num_tokens == 2 and out[0].finish_reason == "stop"
    assert len(srv.bodies) == 3 and eng.retries == 2
    body = srv.bodies[-1]
    assert body["model"] == "served-model" and body["max_tokens"] == 7 and body["seed"] == 5
    assert body["temperature"] == 0.7 and body["top_p"] == 0.9 and body["stop"] == ["###"]
    assert srv.headers[-1]["Authorization"] == "Bearer k"


def test_a_chat_ending_with_an_assistant_message_asks_the_server_to_continue_it(server_factory):
    srv = server_factory()
    eng = engine(srv.url)
    eng.generate([USER, USER + [{"role": "assistant", "content": "You are"}]], SamplingParams())
    plain, prefilled = sorted(srv.bodies, key=lambda b: len(b["messages"]))
    assert "continue_final_message" not in plain and "add_generation_prompt" not in plain
    assert prefilled["continue_final_message"] is True and prefilled["add_generation_prompt"] is False
    assert prefilled["messages"][-1] == {"role": "assistant", "content": "You are"}
    assert not OpenAIEngine.supports_prefill  # plain OpenAI servers ignore the extras: callers must not rely on them


def test_persistent_failure_raises_a_clear_error(server_factory):
    srv = server_factory([err(500, "kaput")] * 10)
    eng = engine(srv.url, max_retries=2)
    with pytest.raises(OpenAIEngineError, match=r"failed after 3 attempts: HTTP 500: kaput.*rerun to resume"):
        eng.generate([USER], SamplingParams())
    assert len(srv.bodies) == 3


def test_client_errors_are_not_retried(server_factory):
    srv = server_factory([err(400, "bad model")])
    with pytest.raises(OpenAIEngineError, match="HTTP 400: bad model") as exc:
        engine(srv.url, max_retries=4).generate([USER], SamplingParams())
    assert exc.value.status == 400 and len(srv.bodies) == 1


def test_connection_errors_are_retried_then_raised():
    eng = engine("http://127.0.0.1:9/v1", max_retries=2, timeout_s=2)  # nothing listens on port 9
    t0 = time.monotonic()
    with pytest.raises(OpenAIEngineError, match="connection error"):
        eng.generate([USER], SamplingParams())
    assert eng.requests_sent == 3 and time.monotonic() - t0 < 10


def test_concurrency_limit_and_order(server_factory):
    srv = server_factory(delay=0.2)
    eng = engine(srv.url, concurrency=3)
    chats = [[{"role": "user", "content": f"q{i}"}] for i in range(7)]
    out = eng.generate(chats, SamplingParams())
    assert [c.text for c in out] == [f"echo q{i}" for i in range(7)]
    assert 2 <= srv.max_inflight <= 3


def test_one_failure_in_a_batch_fails_the_call(server_factory):
    srv = server_factory([err(422, "unprocessable")])
    eng = engine(srv.url, concurrency=2, max_retries=1)
    with pytest.raises(OpenAIEngineError, match="422"):
        eng.generate([USER, USER, USER], SamplingParams())


def test_score_choices_from_top_logprobs(server_factory):
    srv = server_factory(logprobs=True)
    eng = engine(srv.url)
    scores = eng.score_choices([USER, USER], ["A", "B", "tie"])
    import math

    assert scores[0]["B"] == pytest.approx(-0.5)
    assert scores[0]["A"] == pytest.approx(math.log(math.exp(-1.5) + math.exp(-2.0)))  # " A" and "A" pooled
    assert scores[0]["tie"] == pytest.approx(-4.0)  # absent: below the least likely listed token
    body = srv.bodies[0]
    assert body["logprobs"] is True and body["top_logprobs"] == 20 and body["max_tokens"] == 1
    assert eng.can_score
    assert eng.score_choices([USER], ["yes", "no"]) == [{"yes": float("-inf"), "no": float("-inf")}]


def test_score_choices_without_logprobs_is_detected_once(server_factory):
    srv = server_factory(logprobs=False)
    eng = engine(srv.url)
    assert eng.score_choices([USER, USER], ["A", "B"]) is None
    assert eng.score_choices([USER], ["A", "B"]) is None
    assert len(srv.bodies) == 1 and not eng.can_score


def test_from_config_and_make_engine(monkeypatch):
    from prism_persona.config import resolve
    from prism_persona.engines import make_engine

    monkeypatch.setenv("MY_KEY", "sekret")
    cfg = resolve(
        overrides={
            "model": {"model": "org/served"},
            "engine": {
                "engine": "openai",
                "base_url": "http://127.0.0.1:1/v1",
                "api_key_env": "MY_KEY",
                "concurrency": 3,
                "timeout_s": 9,
                "max_retries": 1,
            },
        }
    )
    eng = make_engine(cfg)
    assert isinstance(eng, OpenAIEngine)
    assert (eng.base_url, eng.model_name, eng.api_key, eng.concurrency, eng.timeout_s, eng.max_retries) == (
        "http://127.0.0.1:1/v1",
        "org/served",
        "sekret",
        3,
        9.0,
        1,
    )


# --------------------------------------------------------------------------------------------------
# end to end: OpenAIEngine -> prism serve -> a real gated model


def test_engine_against_prism_serve_with_a_real_artifact(tiny_model_dir, tmp_path):
    import torch

    from prism_persona.gated.model import GatedModel
    from prism_persona.models import encode_prompts, render_chat
    from prism_persona.serve.app import ServeOptions
    from prism_persona.serve.backend import GatedBackend
    from prism_persona.serve.http import PrismServer
    from prism_persona.testing import make_tiny_artifact

    art = make_tiny_artifact(tiny_model_dir, tmp_path / "prism")
    gm = GatedModel.from_pretrained(art, device="cpu", dtype="float32")
    chats = [
        [{"role": "user", "content": q}] for q in ("hi", "write a poem", "fix my code", "as an expert, explain tides")
    ]
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    local = gm.generate(chats, params)
    with PrismServer(GatedBackend(gm), ServeOptions(port=0, max_batch=4, batch_wait_ms=300)) as srv:
        eng = OpenAIEngine(srv.url, "prism", concurrency=4)
        remote = eng.generate(chats, params)
        scores = eng.score_choices(chats, ["A", "B"])
        batch_sizes = list(srv.app.batcher.batch_sizes)
        # the pipeline's judge reads log-prob verdicts through this engine
        from prism_persona.judges import ModelJudge, PairItem

        judge = ModelJudge(eng, "auto")
        verdicts = judge.compare([PairItem("q?", "answer one", "answer two")])
        assert judge.mode == "logprob" and set(verdicts[0].detail) == {"logp_A", "logp_B"}
    assert [c.text for c in remote] == [c.text for c in local]
    assert [c.meta["routed"] for c in remote] == [c.meta["routed"] for c in local]
    assert {c.meta["routed"] for c in remote} == {True, False}  # both paths exercised
    assert [c.meta["gate_prob"] for c in remote] == pytest.approx([c.meta["gate_prob"] for c in local], abs=1e-5)
    assert max(batch_sizes) > 1  # concurrent engine requests were batched by the server

    # log-probs served = the gated model's own first-token distribution, under the same routing
    tok = gm.tokenizer
    enc = encode_prompts(tok, [render_chat(tok, c) for c in chats])
    logits, _, _ = gm.forward_logits(enc["input_ids"], enc["attention_mask"], force=[c.meta["routed"] for c in local])
    logp = torch.log_softmax(logits[:, -1].float(), -1)
    for row, s in enumerate(scores):
        top = torch.topk(logp[row], 20)
        listed = {tok.decode([int(i)]): float(v) for v, i in zip(top.values, top.indices)}
        for choice in ("A", "B"):
            ids = [int(i) for i in top.indices if tok.decode([int(i)]).strip() == choice]
            if ids:
                assert s[choice] == pytest.approx(float(torch.logsumexp(logp[row, ids], 0)), abs=1e-4)
            else:
                assert s[choice] < min(listed.values())
