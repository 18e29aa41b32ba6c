"""Route-only serving: the gate runs here, generation on an upstream OpenAI-compatible server.

The upstream is a scripted fake on 127.0.0.1 that records what it was sent; the router is the fake
gated model (gate fires on "expert") or, for the loader, a real tiny artifact.
"""

from __future__ import annotations

import pytest

from prism_persona.serve.api import Limits
from prism_persona.serve.app import ServeOptions
from prism_persona.serve.backend import GatedBackend
from prism_persona.serve.http import PrismServer
from prism_persona.serve.upstream import Forwarder
from prism_persona.testing import FakeGatedModel, FakeOpenAIServer, http_request, make_tiny_artifact


def fake_upstream():
    """An OpenAI-compatible upstream that answers with the model name it was asked for; 'down' -> 503."""
    return FakeOpenAIServer(reply=lambda body: f"from {body['model']}", down_models=["down"])


@pytest.fixture(scope="module")
def tokenizer():
    from prism_persona.testing import make_tokenizer

    return make_tokenizer()


def route_server(upstream_url: str, tokenizer, lora="prism-lora", base="base-model", **kw) -> PrismServer:
    opts = ServeOptions(port=0, base_name=base, lora_name=lora, upstream=upstream_url, **kw)
    fwd = Forwarder(upstream_url, api_key="up-key", timeout_s=20)
    return PrismServer(GatedBackend(FakeGatedModel(tokenizer)), opts, fwd).start()


def test_route_only_forwards_by_gate_decision(tokenizer):
    from openai import OpenAI

    with fake_upstream() as up, route_server(up.url, tokenizer, limits=Limits(max_new_tokens=64)) as srv:
        client = OpenAI(base_url=srv.url, api_key="x", max_retries=0, timeout=20)
        raw = client.chat.completions.with_raw_response.create(
            model="whatever", messages=[{"role": "user", "content": "as an expert: tides?"}], max_tokens=500
        )
        resp = raw.parse()
        assert resp.choices[0].message.content == "from prism-lora"
        assert resp.model_extra["prism"] == {"routed": True, "gate_prob": 0.9}
        assert raw.headers["X-Prism-Routed"] == "true" and raw.headers["X-Prism-Upstream-Model"] == "prism-lora"
        plain = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert plain.choices[0].message.content == "from base-model"
        assert plain.model_extra["prism"]["routed"] is False
        forced = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], extra_body={"prism": {"force": True}}
        )
        assert forced.choices[0].message.content == "from prism-lora"
        assert forced.model_extra["prism"] == {"routed": True, "gate_prob": 0.1}
    assert [b["model"] for b in up.bodies] == ["prism-lora", "base-model", "prism-lora"]
    assert all("prism" not in b for b in up.bodies)  # the routing field is not forwarded
    assert up.bodies[0]["max_tokens"] == 64  # clamped before forwarding
    assert up.auth == ["Bearer up-key"] * 3


def test_route_only_streams_through(tokenizer):
    from openai import OpenAI

    with fake_upstream() as up, route_server(up.url, tokenizer) as srv:
        client = OpenAI(base_url=srv.url, api_key="x", max_retries=0, timeout=20)
        chunks = list(
            client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "expert question"}], stream=True
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "from prism-lora"
        assert all(c.model_extra["prism"] == {"routed": True, "gate_prob": 0.9} for c in chunks)
        assert chunks[-1].choices[0].finish_reason == "stop"
    assert up.bodies[0]["stream"] is True


def test_route_only_upstream_errors(tokenizer):
    with fake_upstream() as up, route_server(up.url, tokenizer, lora="down") as srv:
        status, _, body = http_request(
            srv, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "expert"}]}
        )
        assert status == 503 and body["error"]["message"] == "overloaded"  # passed through
        status, _, body = http_request(
            srv, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}
        )
        assert status == 200
    with route_server("http://127.0.0.1:9/v1", tokenizer) as srv:  # nothing listens on the discard port
        status, _, body = http_request(
            srv, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}
        )
        assert status == 502 and body["error"]["code"] == "upstream_unreachable"


def test_router_loads_layer0_only_and_routes_like_the_full_model(tiny_model_dir, tmp_path):
    from prism_persona.gated.model import GatedModel
    from prism_persona.gated.router import load_router

    art = make_tiny_artifact(tiny_model_dir, tmp_path / "prism")
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

    upstream_model = FakeGatedModel(tokenizer)
    with (
        PrismServer(GatedBackend(upstream_model), ServeOptions(port=0)).start() as up,
        route_server(up.url, tokenizer) as srv,
    ):
        client = OpenAI(base_url=srv.url, api_key="x", max_retries=0, timeout=20)
        chunks = list(
            client.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": "a long question, sent in several chunks"}],
                stream=True,
                extra_body={"prism": {"force": True}},
            )
        )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "base answer to: a long question, sent in several chunks"  # the upstream's own answer
    assert len(chunks) > 3
    # the router's routing replaces whatever the upstream reported
    assert all(c.model_extra["prism"] == {"routed": True, "gate_prob": 0.1} for c in chunks)
    assert upstream_model.batches[0]["force"] == [None]  # the prism field was not forwarded
