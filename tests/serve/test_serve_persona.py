"""`prism serve` with a K-way artifact (one adapter per persona): each response names its persona and the
gate's probability of it, ``prism.force`` takes a persona's name, and route-only sends each routed request
to the upstream model named by its persona."""

from __future__ import annotations

import pytest

from prism_persona.serve.app import ServeOptions
from prism_persona.serve.backend import GatedBackend
from prism_persona.serve.http import PrismServer
from prism_persona.testing import SPLIT_QUERIES, FakeOpenAIServer, http_request, make_tiny_artifact, serve_fake

NAMES = ("story", "monitor")
WANT = [None, "story", "monitor", None]  # the tiny K-way artifact sends query i to class i mod 3


@pytest.fixture(scope="module")
def kway(tiny_model_dir, tmp_path_factory):
    from prism_persona.gated.model import GatedModel

    art = make_tiny_artifact(tiny_model_dir, tmp_path_factory.mktemp("kway") / "prism", personas=NAMES)
    gm = GatedModel.from_pretrained(art, device="cpu", dtype="float32")
    yield art, gm
    gm.close()


def ask(srv, query, force=None, stream=False):
    body = {"model": "prism", "messages": [{"role": "user", "content": query}], "max_tokens": 2}
    if force is not None:
        body["prism"] = {"force": force}
    if stream:
        body["stream"] = True
    return http_request(srv, "POST", "/v1/chat/completions", body)


def test_each_response_names_its_persona(kway):
    _, gm = kway
    want = gm.decisions([[{"role": "user", "content": q}] for q in SPLIT_QUERIES])
    with serve_fake(gm) as srv:
        for q, name, d in zip(SPLIT_QUERIES, WANT, want):
            status, headers, resp = ask(srv, q)
            assert status == 200, resp
            assert resp["prism"]["persona"] == name == d["persona_name"]
            assert resp["prism"]["persona_prob"] == d["persona_prob"]
            assert resp["prism"]["routed"] is (name is not None)
            assert headers.get("X-Prism-Persona") == name
            if name:
                assert float(headers["X-Prism-Persona-Prob"]) == pytest.approx(d["persona_prob"], abs=1e-6)
        # the stream's chunks carry the same block
        status, _, text = ask(srv, SPLIT_QUERIES[2], stream=True)
        assert status == 200 and '"persona":"monitor"' in text


def test_force_a_persona_by_name_and_unknown_names_are_400(kway):
    _, gm = kway
    with serve_fake(gm) as srv:
        status, headers, resp = ask(srv, SPLIT_QUERIES[0], force="monitor")  # the gate: base
        assert status == 200 and resp["prism"]["routed"] and resp["prism"]["persona"] == "monitor"
        assert headers["X-Prism-Persona"] == "monitor"
        assert resp["prism"]["persona_prob"] < 0.5  # the gate's own probability of the forced persona
        status, _, resp = ask(srv, SPLIT_QUERIES[1], force=True)
        assert resp["prism"]["persona"] == "story"  # forced on: the gate's most probable persona
        status, _, resp = ask(srv, SPLIT_QUERIES[1], force=False)
        assert not resp["prism"]["routed"] and resp["prism"]["persona"] is None
        status, _, resp = ask(srv, "hi", force="poet")
        assert status == 400 and resp["error"]["param"] == "prism.force" and resp["error"]["code"] == "invalid_value"
        assert (
            resp["error"]["message"]
            == "'prism.force': unknown persona 'poet'; this artifact's personas: story, monitor"
        )
        status, _, resp = ask(srv, "hi", force=3)
        assert status == 400 and resp["error"]["code"] == "invalid_type"


def test_route_only_sends_each_routed_request_to_its_personas_adapter(kway):
    from prism_persona.gated.router import load_router
    from prism_persona.serve.upstream import Forwarder

    art, _ = kway
    router = load_router(str(art), device="cpu", dtype="float32")
    with FakeOpenAIServer(reply=lambda body: f"from {body['model']}") as up:
        opts = ServeOptions(port=0, base_name="base", lora_name="lora", upstream=up.url)
        with PrismServer(GatedBackend(router), opts, Forwarder(up.url, api_key="k", timeout_s=20)).start() as srv:
            for q, name in zip(SPLIT_QUERIES, WANT):
                status, headers, resp = ask(srv, q)
                assert status == 200, resp
                assert resp["prism"]["persona"] == name
                assert headers["X-Prism-Upstream-Model"] == (name or "base")
                assert resp["choices"][0]["message"]["content"] == f"from {name or 'base'}"
            _, headers, resp = ask(srv, SPLIT_QUERIES[1], force="monitor")
            assert headers["X-Prism-Upstream-Model"] == "monitor" and resp["prism"]["persona"] == "monitor"
            assert resp["prism"]["persona_prob"] < 0.5
            status, _, _ = ask(srv, "hi", force="poet")
            assert status == 400
    assert [b["model"] for b in up.bodies] == ["base", "story", "monitor", "base", "monitor"]
    router.close()
