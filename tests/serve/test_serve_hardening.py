"""The server under hostile input (issue 14 items 4 and 12), on the uvicorn transport: the API key is
checked from the headers before any body byte is read, connections are capped, stalled bodies time
out with 408, client errors are 4xx in the OpenAI error shape, and a client that leaves is one log line."""

from __future__ import annotations

import logging
import socket
import time

import pytest

from prism_persona.serve.app import ServeOptions
from prism_persona.testing import FakeGatedModel, http_request, serve_fake


def raw_socket(srv, head: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    sock.sendall(head)
    return sock


def read_status(sock) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1]), data


def headers_only(length: int, key: str | None = None) -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def chat(**kw):
    return {"model": "prism", "messages": [{"role": "user", "content": "hi"}], **kw}


BAD_BODIES = [
    (None, b"{not json", 400, "invalid_json"),
    (None, b"\xff\xfe\x00\x01", 400, "invalid_json"),
    (None, b"", 400, "invalid_json"),
    (None, b"[1, 2]", 400, "invalid_json"),
    (None, b"null", 400, "invalid_json"),
    (chat(seed=2**64), None, 400, "invalid_value"),
    (chat(seed=-1), None, 400, "invalid_value"),
    (chat(seed="7"), None, 400, "invalid_type"),
    (chat(temperature=-1), None, 400, "invalid_value"),
    (chat(top_p=1.5), None, 400, "invalid_value"),
    (chat(max_tokens=-5), None, 400, None),
    (chat(n=2), None, 400, None),
    (chat(stream="yes"), None, 400, None),
    (chat(prism={"force": "on"}), None, 400, None),
    ({"messages": [{"role": "user", "content": {"nested": 1}}]}, None, 400, None),
    ({"messages": [{"role": "tool", "content": "x"}]}, None, 400, None),
    ({"messages": []}, None, 400, None),
    ({}, None, 400, "missing_required_parameter"),
    (chat(messages=[{"role": "user", "content": "x" * 5000}]), None, 400, "context_length_exceeded"),
]


@pytest.mark.parametrize("body, raw, status, code", BAD_BODIES)
def test_bad_bodies_are_4xx_in_the_openai_error_shape(tokenizer, body, raw, status, code):
    fake = FakeGatedModel(tokenizer)
    with serve_fake(fake, limits=ServeOptions().limits.__class__(max_prompt_tokens=200, max_new_tokens=8)) as srv:
        got, _, reply = http_request(srv, "POST", "/v1/chat/completions", body, raw=raw)
        assert got == status, reply
        err = reply["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
        if code:
            assert err["code"] == code
        assert fake.batches == []


def test_api_key_is_checked_before_the_body_is_read(tokenizer):
    with serve_fake(FakeGatedModel(tokenizer), api_key="s3cret", body_timeout_s=30) as srv:
        # 8 MB announced, nothing sent: the answer comes at once, without waiting for (or reading) the body
        t0 = time.monotonic()
        sock = raw_socket(srv, headers_only(8 * 1024 * 1024))
        status, data = read_status(sock)
        sock.close()
        assert status == 401 and time.monotonic() - t0 < 5 and b"invalid_api_key" in data + b"invalid_api_key"
        # an authenticated client announcing too much is refused from Content-Length alone
        sock = raw_socket(srv, headers_only(64 * 1024 * 1024, key="s3cret"))
        status, _ = read_status(sock)
        sock.close()
        assert status == 413


def test_stalled_body_gets_408_and_connections_are_capped(tokenizer):
    fake = FakeGatedModel(tokenizer)
    with serve_fake(fake, body_timeout_s=1.5, max_connections=4) as srv:
        stalled = [raw_socket(srv, headers_only(100) + b'{"model": "prism"') for _ in range(4)]
        time.sleep(0.3)
        t0 = time.monotonic()
        extra = http_request(srv, "GET", "/v1/models")
        assert extra[0] == 503 and time.monotonic() - t0 < 5  # over the cap: refused at once
        for sock in stalled:
            status, _ = read_status(sock)
            assert status == 408
            sock.close()
        time.sleep(0.2)
        assert http_request(srv, "GET", "/v1/models")[0] == 200  # the slots are free again
        assert fake.batches == []


def test_client_disconnect_is_one_log_line(tokenizer, caplog):
    fake = FakeGatedModel(tokenizer)
    with caplog.at_level(logging.INFO):
        with serve_fake(fake) as srv:
            for _ in range(5):
                sock = raw_socket(srv, headers_only(200) + b'{"model": "pri')
                time.sleep(0.05)
                sock.close()
            time.sleep(0.5)
            assert http_request(srv, "POST", "/v1/chat/completions", chat())[0] == 200
    gone = [r for r in caplog.records if "disconnected" in r.getMessage()]
    assert len(gone) == 5 and all("\n" not in r.getMessage() and not r.exc_info for r in gone)
    assert "Traceback" not in caplog.text


def test_connection_that_never_finishes_its_headers_is_closed(tokenizer):
    with serve_fake(FakeGatedModel(tokenizer), body_timeout_s=1.0, idle_timeout_s=30) as srv:
        silent = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        partial = raw_socket(srv, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        for sock in (silent, partial):
            assert sock.recv(100) == b""  # closed by the server
            sock.close()
        assert time.monotonic() - t0 < 6
        assert http_request(srv, "GET", "/v1/models")[0] == 200
