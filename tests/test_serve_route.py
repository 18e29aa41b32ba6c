"""Route-only serving: the gate runs here, generation on an upstream OpenAI-compatible server.

The upstream is a scripted fake on 127.0.0.1 that records what it was sent; the router is the fake
gated model (gate fires on "expert") or, for the loader, a real tiny artifact.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from prism_persona.serve import Forwarder, PrismServer, ServeOptions
from prism_persona.serve_api import Limits
from prism_persona.serve_backend import GatedBackend
from test_serve import FakeGated, make_artifact, request


class FakeUpstream:
    """A tiny OpenAI-compatible upstream: echoes the model name it was asked for; model 'down' -> 503."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.auth: list[str] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.bodies.append(body)
                outer.auth.append(self.headers.get("Authorization", ""))
                if body["model"] == "down":
                    return self._json(503, {"error": {"message": "overloaded", "type": "server_error",
                                                      "param": None, "code": None}})
                text = f"from {body['model']}"
                if not body.get("stream"):
                    return self._json(200, {"id": "up-1", "object": "chat.completion", "created": 1,
                                            "model": body["model"],
                                            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                                                         "message": {"role": "assistant", "content": text}}],
                                            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                for delta, fin in (({"role": "assistant", "content": ""}, None), ({"content": "from "}, None),
                                   ({"content": body["model"]}, None), ({}, "stop")):
                    ev = {"id": "up-2", "object": "chat.completion.chunk", "created": 1, "model": body["model"],
                          "choices": [{"index": 0, "delta": delta, "finish_reason": fin}]}
                    self.wfile.write(f"data: {json.dumps(ev)}\n\n".encode())
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")
                self.close_connection = True

            def _json(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def tokenizer():
    from prism_persona.testing import make_tokenizer

    return make_tokenizer()


def route_server(upstream_url: str, tokenizer, lora="prism-lora", base="base-model", **kw) -> PrismServer:
    opts = ServeOptions(port=0, base_name=base, lora_name=lora, upstream=upstream_url, **kw)
    fwd = Forwarder(upstream_url, api_key="up-key", timeout_s=20)
    return PrismServer(GatedBackend(FakeGated(tokenizer)), opts, fwd).start()


def test_route_only_forwards_by_gate_decision(tokenizer):
    from openai import OpenAI

    with FakeUpstream() as up, route_server(up.url, tokenizer, limits=Limits(max_new_tokens=64)) as srv:
        client = OpenAI(base_url=srv.url, api_key="x", max_retries=0, timeout=20)
        raw = client.chat.completions.with_raw_response.create(
            model="whatever", messages=[{"role": "user", "content": "as an expert: tides?"}], max_tokens=500)
        resp = raw.parse()
        assert resp.choices[0].message.content == "from prism-lora"
        assert resp.model_extra["prism"] == {"routed": True, "gate_prob": 0.9}
        assert raw.headers["X-Prism-Routed"] == "true" and raw.headers["X-Prism-Upstream-Model"] == "prism-lora"
        plain = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert plain.choices[0].message.content == "from base-model"
        assert plain.model_extra["prism"]["routed"] is False
        forced = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                extra_body={"prism": {"force": True}})
        assert forced.choices[0].message.content == "from prism-lora"
        assert forced.model_extra["prism"] == {"routed": True, "gate_prob": 0.1}
    assert [b["model"] for b in up.bodies] == ["prism-lora", "base-model", "prism-lora"]
    assert all("prism" not in b for b in up.bodies)  # the routing field is not forwarded
    assert up.bodies[0]["max_tokens"] == 64  # clamped before forwarding
    assert up.auth == ["Bearer up-key"] * 3


def test_route_only_streams_through(tokenizer):
    from openai import OpenAI

    with FakeUpstream() as up, route_server(up.url, tokenizer) as srv:
        client = OpenAI(base_url=srv.url, api_key="x", max_retries=0, timeout=20)
        chunks = list(client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "expert question"}], stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "from prism-lora"
        assert all(c.model_extra["prism"] == {"routed": True, "gate_prob": 0.9} for c in chunks)
        assert chunks[-1].choices[0].finish_reason == "stop"
    assert up.bodies[0]["stream"] is True


def test_route_only_upstream_errors(tokenizer):
    with FakeUpstream() as up, route_server(up.url, tokenizer, lora="down") as srv:
        status, _, body = request(srv, "POST", "/v1/chat/completions",
                                  {"messages": [{"role": "user", "content": "expert"}]})
        assert status == 503 and body["error"]["message"] == "overloaded"  # passed through
        status, _, body = request(srv, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
        assert status == 200
    with route_server("http://127.0.0.1:9/v1", tokenizer) as srv:  # nothing listens on the discard port
        status, _, body = request(srv, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
        assert status == 502 and body["error"]["code"] == "upstream_unreachable"


def test_router_loads_layer0_only_and_routes_like_the_full_model(tiny_model_dir, tmp_path):
    from prism_persona.gated import GatedModel
    from prism_persona.serve_backend import load_router

    art = make_artifact(tiny_model_dir, tmp_path / "prism")
    full = GatedModel.from_pretrained(art, device="cpu", dtype="float32")
    router = load_router(str(art), device="cpu", dtype="float32")
    assert len(router.model.model.layers) == 1 and len(full.model.model.layers) == 3
    chats = [[{"role": "user", "content": q}] for q in ("hi", "write a poem", "fix my code", "as an expert, explain")]
    got, want = router.route(chats), full.route(chats)
    assert [r for _, r in got] == [r for _, r in want]
    assert [p for p, _ in got] == pytest.approx([p for p, _ in want], abs=1e-6)
    assert {r for _, r in want} == {True, False}  # the artifact's gate really splits these


def test_route_only_relays_a_chunked_upstream_stream(tokenizer):
    """prism serve itself (chunked transfer encoding, like vLLM's server) as the upstream."""
    from openai import OpenAI

    from test_serve import start

    upstream_model = FakeGated(tokenizer)
    with start(upstream_model) as up, route_server(up.url, tokenizer) as srv:
        client = OpenAI(base_url=srv.url, api_key="x", max_retries=0, timeout=20)
        chunks = list(client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "a long question, sent in several chunks"}],
            stream=True, extra_body={"prism": {"force": True}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "base answer to: a long question, sent in several chunks"  # the upstream's own answer
    assert len(chunks) > 3
    # the router's routing replaces whatever the upstream reported
    assert all(c.model_extra["prism"] == {"routed": True, "gate_prob": 0.1} for c in chunks)
    assert upstream_model.batches[0]["force"] == [None]  # the prism field was not forwarded
