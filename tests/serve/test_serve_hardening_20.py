"""Issue 20, items 9-11: the server's memory stays flat under rejected over-long prompts, deeply nested
JSON and transport-level refusals answer in OpenAI's error shape, and --idle-timeout-s is obeyed."""

from __future__ import annotations

import json
import socket
import time

import pytest

from prism_persona.serve.api import Limits
from prism_persona.serve.app import ServeOptions
from prism_persona.serve.backend import GatedBackend
from prism_persona.serve.http import PrismServer
from prism_persona.serve.upstream import Forwarder
from prism_persona.testing import FakeGatedModel, FakeOpenAIServer, http_request, serve_fake


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def chat(content="hi", **kw):
    return {"model": "prism", "messages": [{"role": "user", "content": content}], **kw}


def openai_error(reply) -> dict:
    assert isinstance(reply, dict), f"not JSON: {reply!r}"
    err = reply["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err


def route_server(tokenizer, upstream_url: str) -> PrismServer:
    opts = ServeOptions(port=0, base_name="base", lora_name="lora", upstream=upstream_url)
    return PrismServer(GatedBackend(FakeGatedModel(tokenizer)), opts, Forwarder(upstream_url, timeout_s=20)).start()


# --------------------------------------------------------------------------------------------------
# item 9: rejected over-long prompts do not grow the server's memory


def test_item9_rejected_long_prompts_are_cheap_and_keep_memory_flat(tokenizer):
    """A prompt far over --max-prompt-tokens is refused without tokenizing all of it: at once, and the
    server's memory does not grow with every refusal (the probe: +5.4 MB per request, never returned)."""
    fake = FakeGatedModel(tokenizer)
    long_text = "word " * 200_000  # 1 MB of text, far over 200 tokens
    with serve_fake(fake, limits=Limits(max_prompt_tokens=200, max_new_tokens=8)) as srv:
        http_request(srv, "POST", "/v1/chat/completions", chat("warm up"))
        before, t0 = rss_mb(), time.monotonic()
        for _ in range(6):
            status, _, reply = http_request(srv, "POST", "/v1/chat/completions", chat(long_text))
            assert status == 400 and openai_error(reply)["code"] == "context_length_exceeded"
        took, grown = time.monotonic() - t0, rss_mb() - before
    assert took < 6, f"6 refusals took {took:.1f} s: the whole prompt was tokenized"
    assert grown < 30, f"RSS grew {grown:.0f} MB over 6 rejected prompts"
    assert len(fake.batches) == 1


# --------------------------------------------------------------------------------------------------
# item 10: nested JSON, a bad Content-Length and the connection cap answer in the OpenAI error shape


NESTED = b'{"model": "prism", "messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"


def test_item10_deeply_nested_json_is_400_locally(tokenizer):
    fake = FakeGatedModel(tokenizer)
    with serve_fake(fake) as srv:
        status, _, reply = http_request(srv, "POST", "/v1/chat/completions", raw=NESTED)
        assert status == 400 and openai_error(reply)["type"] == "invalid_request_error", reply
        assert http_request(srv, "POST", "/v1/chat/completions", chat())[0] == 200
    assert len(fake.batches) == 1


def test_item10_deeply_nested_json_is_400_in_route_only(tokenizer):
    with FakeOpenAIServer() as up, route_server(tokenizer, up.url) as srv:
        status, _, reply = http_request(srv, "POST", "/v1/chat/completions", raw=NESTED)
        assert status == 400 and openai_error(reply)["type"] == "invalid_request_error", reply
        assert up.bodies == []


def read_response(sock) -> tuple[int, bytes]:
    """(status, body) of one whole HTTP response with a Content-Length (or up to the close)."""
    got = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
        head, _, body = got.partition(b"\r\n\r\n")
        length = [h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")]
        if length and len(body) >= int(length[0].split(b":")[1]):
            break
    head, _, body = got.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def raw_exchange(srv, data: bytes) -> tuple[int, bytes]:
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    try:
        sock.sendall(data)
        return read_response(sock)
    finally:
        sock.close()


@pytest.mark.parametrize("length", [b"abc", b"-5", b"1, 2"])
def test_item10_bad_content_length_is_the_openai_error_shape(tokenizer, length):
    with serve_fake(FakeGatedModel(tokenizer)) as srv:
        status, body = raw_exchange(
            srv, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + length + b"\r\n\r\n{}"
        )
    assert status == 400
    openai_error(json.loads(body))


def test_item10_connection_cap_is_the_openai_error_shape(tokenizer):
    with serve_fake(FakeGatedModel(tokenizer), max_connections=2, body_timeout_s=5) as srv:
        held = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(2)]
        for sock in held:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        time.sleep(0.3)
        status, _, reply = http_request(srv, "GET", "/v1/models")
        for sock in held:
            sock.close()
    assert status == 503
    assert openai_error(reply)["type"] == "server_error"


# --------------------------------------------------------------------------------------------------
# item 11: --idle-timeout-s closes idle keep-alive connections


def test_item11_idle_timeout_closes_keep_alive_connections(tokenizer):
    with serve_fake(FakeGatedModel(tokenizer), idle_timeout_s=1) as srv:
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock)[0] == 200
        t0 = time.monotonic()
        sock.settimeout(4.0)
        try:
            closed = sock.recv(100) == b""
        except TimeoutError:
            closed = False
        sock.close()
    waited = time.monotonic() - t0
    assert closed and waited < 3.0, f"the idle connection stayed open {waited:.1f} s with --idle-timeout-s 1"
