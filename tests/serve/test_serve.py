"""`prism serve` over the real HTTP stack on 127.0.0.1, with a fake gated model (GatedModel's interface).

The fake records every generate call (batch size, params, force) so batching and forced routing are
asserted on what the model actually received.
"""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest

from prism_persona.serve.api import Limits
from prism_persona.testing import FakeGatedModel, http_request, serve_fake


def chat_body(content="hello there", **kw):
    return {"model": "prism", "messages": [{"role": "user", "content": content}], **kw}


def assert_error(resp, expected_status, code=None, param=None):
    """``resp`` is ``http_request()``'s (status, headers, body)."""
    status, _, body = resp
    assert status == expected_status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param


# --------------------------------------------------------------------------------------------------
# the official openai client, unchanged


def test_openai_client_non_streaming(tokenizer):
    from openai import OpenAI

    fake = FakeGatedModel(tokenizer)
    with serve_fake(fake) as srv:
        client = OpenAI(base_url=srv.url, api_key="unused", max_retries=0, timeout=20)
        raw = client.chat.completions.with_raw_response.create(
            model="prism", messages=[{"role": "user", "content": "as an expert, explain tides"}], max_tokens=50
        )
        resp = raw.parse()
        assert resp.choices[0].message.content == "EXPERT answer to: as an expert, explain tides"
        assert resp.choices[0].finish_reason == "stop"
        assert resp.model == "prism" and resp.object == "chat.completion"
        assert resp.usage.completion_tokens == 8 and resp.usage.prompt_tokens > 10  # counted by the tokenizer
        assert resp.model_extra["prism"] == {"routed": True, "gate_prob": 0.9}
        assert raw.headers["X-Prism-Routed"] == "true" and float(raw.headers["X-Prism-Gate-Prob"]) == 0.9

        plain = client.chat.completions.create(model="anything", messages=[{"role": "user", "content": "hi"}])
        assert plain.choices[0].message.content == "base answer to: hi"
        assert plain.model_extra["prism"] == {"routed": False, "gate_prob": 0.1}
        assert [m.id for m in client.models.list().data] == ["prism"]


def test_openai_client_streaming(tokenizer):
    from openai import OpenAI

    fake = FakeGatedModel(tokenizer)
    with serve_fake(fake) as srv:
        client = OpenAI(base_url=srv.url, api_key="unused", max_retries=0, timeout=20)
        content = "a rather long question so that the answer arrives in several pieces"
        stream = client.chat.completions.create(
            model="prism",
            messages=[{"role": "user", "content": content}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == f"base answer to: {content}"
        assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 2
        assert chunks[0].choices[0].delta.role == "assistant"
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == ["stop"]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(text.split())
        assert all(c.model_extra["prism"]["routed"] is False for c in chunks)

        # the raw stream ends with data: [DONE] and carries the routing headers
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=20)
        conn.request(
            "POST",
            "/v1/chat/completions",
            json.dumps(chat_body("expert q", stream=True)),
            {"Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        body = resp.read().decode()
        conn.close()
        assert resp.getheader("Content-Type").startswith("text/event-stream")
        assert resp.getheader("X-Prism-Routed") == "true"
        events = [line for line in body.split("\n") if line]
        assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_forced_routing_via_extra_body(tokenizer):
    from openai import OpenAI

    fake = FakeGatedModel(tokenizer)
    with serve_fake(fake) as srv:
        client = OpenAI(base_url=srv.url, api_key="unused", max_retries=0, timeout=20)
        on = client.chat.completions.create(
            model="prism", messages=[{"role": "user", "content": "hi"}], extra_body={"prism": {"force": True}}
        )
        off = client.chat.completions.create(
            model="prism", messages=[{"role": "user", "content": "expert hi"}], extra_body={"prism": {"force": False}}
        )
    assert on.model_extra["prism"] == {"routed": True, "gate_prob": 0.1}
    assert on.choices[0].message.content.startswith("EXPERT")
    assert off.model_extra["prism"] == {"routed": False, "gate_prob": 0.9}
    assert [b["force"] for b in fake.batches] == [[True], [False]]


# --------------------------------------------------------------------------------------------------
# batching, back-pressure, failures


def test_concurrent_requests_share_one_batch(tokenizer):
    fake = FakeGatedModel(tokenizer)
    n = 4
    results: list = [None] * n
    barrier = threading.Barrier(n)
    with serve_fake(fake, max_batch=n, batch_wait_ms=2000) as srv:

        def worker(i):
            barrier.wait(10)
            force = {"force": True} if i == 0 else None
            results[i] = http_request(srv, "POST", "/v1/chat/completions", chat_body(f"question {i}", prism=force))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        # a different temperature is never mixed into the same generate call
        status, _, other = http_request(srv, "POST", "/v1/chat/completions", chat_body("later", temperature=0.5))
    assert [b["n"] for b in fake.batches] == [n, 1]
    assert sorted(fake.batches[0]["force"], key=str) == [None, None, None, True]
    assert fake.batches[1]["params"].temperature == 0.5 and status == 200
    for i, (status, _, body) in enumerate(results):
        assert status == 200
        assert body["choices"][0]["message"]["content"].endswith(f"question {i}")
        assert body["prism"]["routed"] is (i == 0)


def test_full_queue_answers_429_at_once(tokenizer):
    gate = threading.Event()
    fake = FakeGatedModel(tokenizer, gate=gate)
    with serve_fake(fake, max_batch=1, queue_size=1, batch_wait_ms=0) as srv:
        first: dict = {}
        t1 = threading.Thread(
            target=lambda: first.update(r=http_request(srv, "POST", "/v1/chat/completions", chat_body("a")))
        )
        t1.start()
        assert fake.started.wait(10)  # the worker is busy with the first request
        second: dict = {}
        t2 = threading.Thread(
            target=lambda: second.update(r=http_request(srv, "POST", "/v1/chat/completions", chat_body("b")))
        )
        t2.start()
        deadline = time.monotonic() + 10
        while srv.app.batcher.pending < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        t0 = time.monotonic()
        status, headers, body = http_request(srv, "POST", "/v1/chat/completions", chat_body("c"))
        assert time.monotonic() - t0 < 5
        assert_error((status, headers, body), 429, code="queue_full")
        assert body["error"]["type"] == "rate_limit_error" and headers["Retry-After"] == "1"
        gate.set()
        t1.join(20)
        t2.join(20)
    assert first["r"][0] == 200 and second["r"][0] == 200


def test_generation_error_is_500_and_worker_survives(tokenizer):
    fake = FakeGatedModel(tokenizer)
    with serve_fake(fake) as srv:
        status, _, body = http_request(srv, "POST", "/v1/chat/completions", chat_body("boom"))
        assert_error((status, None, body), 500, code="internal_error")
        assert "boom requested" in body["error"]["message"]
        status, _, body = http_request(srv, "POST", "/v1/chat/completions", chat_body("fine"))
        assert status == 200 and body["choices"][0]["message"]["content"] == "base answer to: fine"


# --------------------------------------------------------------------------------------------------
# validation and safety


def test_bad_requests_get_openai_style_400(tokenizer):
    fake = FakeGatedModel(tokenizer)
    with serve_fake(fake, limits=Limits(max_prompt_tokens=120, max_new_tokens=5)) as srv:
        post = lambda body=None, raw=None: http_request(srv, "POST", "/v1/chat/completions", body, raw=raw)  # noqa: E731
        assert_error(post(raw=b"{not json"), 400, code="invalid_json")
        assert_error(post(raw=b"[1, 2]"), 400, code="invalid_json")
        assert_error(post({"model": "prism"}), 400, code="missing_required_parameter", param="messages")
        assert_error(post({"messages": []}), 400, param="messages")
        assert_error(post({"messages": "hi"}), 400, code="invalid_type", param="messages")
        assert_error(post({"messages": [{"role": "wizard", "content": "x"}]}), 400, param="messages[0].role")
        assert_error(post({"messages": [{"role": "user"}]}), 400, param="messages[0].content")
        assert_error(post({"messages": [{"role": "user", "content": 5}]}), 400, param="messages[0].content")
        assert_error(post(chat_body(temperature="hot")), 400, code="invalid_type", param="temperature")
        assert_error(post(chat_body(temperature=7)), 400, code="invalid_value", param="temperature")
        assert_error(post(chat_body(max_tokens="10")), 400, param="max_tokens")
        assert_error(post(chat_body(max_tokens=0)), 400, param="max_tokens")
        assert_error(post(chat_body(n=3)), 400, param="n")
        assert_error(post(chat_body(stream="yes")), 400, param="stream")
        assert_error(post(chat_body(prism={"force": "on"})), 400, param="prism.force")
        assert_error(post(chat_body("x" * 200)), 400, code="context_length_exceeded", param="messages")
        assert fake.batches == []  # nothing invalid reached the model

        status, headers, body = post(chat_body("one two three four five six seven", max_tokens=1000))
        assert status == 200 and headers["X-Prism-Max-Tokens-Clamped"] == "5"
        assert body["choices"][0]["finish_reason"] == "length"
        assert fake.batches[-1]["params"].max_new_tokens == 5
        # list-of-text-parts content and the developer role are accepted
        status, _, body = post(
            {
                "messages": [
                    {"role": "developer", "content": "be brief"},
                    {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                ]
            }
        )
        assert status == 200 and body["choices"][0]["message"]["content"] == "base answer to: hi"


def test_api_key_and_routes(tokenizer):
    from openai import AuthenticationError, OpenAI

    fake = FakeGatedModel(tokenizer)
    with serve_fake(fake, api_key="s3cret") as srv:
        assert http_request(srv, "GET", "/health")[0] == 200  # no key needed
        assert_error(http_request(srv, "GET", "/v1/models"), 401, code="invalid_api_key")
        assert_error(
            http_request(srv, "POST", "/v1/chat/completions", chat_body(), {"Authorization": "Bearer nope"}),
            401,
            code="invalid_api_key",
        )
        assert_error(
            http_request(srv, "GET", "/v1/nothing", headers={"Authorization": "Bearer s3cret"}),
            404,
            code="unknown_route",
        )
        assert_error(http_request(srv, "GET", "/v1/chat/completions", headers={"Authorization": "Bearer s3cret"}), 405)
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=srv.url, api_key="wrong", max_retries=0).models.list()
        ok = OpenAI(base_url=srv.url, api_key="s3cret", max_retries=0, timeout=20)
        assert ok.chat.completions.create(model="prism", messages=[{"role": "user", "content": "q"}]).choices
    assert len(fake.batches) == 1


def test_logprobs_for_the_first_token(tokenizer):
    fake = FakeGatedModel(tokenizer, vocab=len(tokenizer))
    with serve_fake(fake) as srv:
        status, _, body = http_request(
            srv, "POST", "/v1/chat/completions", chat_body("hi", max_tokens=1, logprobs=True, top_logprobs=5)
        )
        assert status == 200
        entry = body["choices"][0]["logprobs"]["content"][0]
        top = entry["top_logprobs"]
        assert len(top) == 5 and top[0]["token"] == tokenizer.decode([ord("B")])
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert top[0]["logprob"] < 0 and entry["token"] == "b"  # first token of "base answer..."
        status, _, body = http_request(srv, "POST", "/v1/chat/completions", chat_body("hi"))
        assert body["choices"][0]["logprobs"] is None


def test_shutdown_lets_inflight_requests_finish(tokenizer):
    gate = threading.Event()
    fake = FakeGatedModel(tokenizer, gate=gate)
    srv = serve_fake(fake)
    port = srv.port
    result: dict = {}
    t = threading.Thread(
        target=lambda: result.update(r=http_request(srv, "POST", "/v1/chat/completions", chat_body("slow")))
    )
    t.start()
    assert fake.started.wait(10)
    finished: dict = {}
    stopper = threading.Thread(target=lambda: finished.update(ok=srv.shutdown(grace_s=20)))
    stopper.start()
    time.sleep(0.3)
    assert stopper.is_alive()  # waiting for the in-flight request
    gate.set()
    stopper.join(20)
    t.join(20)
    assert finished["ok"] is True and result["r"][0] == 200
    with pytest.raises(OSError):
        http.client.HTTPConnection("127.0.0.1", port, timeout=2).request("GET", "/health")
