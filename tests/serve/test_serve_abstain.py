"""The abstain decision (issue 29) in what `prism serve`, `prism generate` and `prism chat` report: a
real tiny artifact whose gate has an abstain region (``make_tiny_artifact(..., ood=True)``)."""

from __future__ import annotations

import io

import pytest

from prism_persona.engines.base import Completion
from prism_persona.serve.app import ServeOptions
from prism_persona.serve.backend import GatedBackend
from prism_persona.serve.http import PrismServer
from prism_persona.testing import SPLIT_QUERIES, FakeOpenAIServer, http_request, make_tiny_artifact, serve_fake

FAR = "a much longer request about the history of the printing press in Europe"


@pytest.fixture(scope="module")
def gated(tiny_model_dir, tmp_path_factory):
    from prism_persona.gated.model import GatedModel

    art = make_tiny_artifact(tiny_model_dir, tmp_path_factory.mktemp("abstain") / "prism", ood=True)
    return art, GatedModel.from_pretrained(art, device="cpu", dtype="float32")


def ask(srv, query):
    body = {"model": "prism", "messages": [{"role": "user", "content": query}], "max_tokens": 2}
    status, headers, resp = http_request(srv, "POST", "/v1/chat/completions", body)
    assert status == 200, resp
    return headers, resp["prism"]


def test_serve_reports_abstained_as_the_gate_decides(gated):
    _, gm = gated
    queries = list(SPLIT_QUERIES) + [FAR]
    want = gm.decisions([[{"role": "user", "content": q}] for q in queries])
    assert want[-1]["abstained"] and not all(d["abstained"] for d in want)  # both cases are exercised
    with serve_fake(gm) as srv:
        for q, d in zip(queries, want):
            headers, prism = ask(srv, q)
            assert prism == {"routed": d["routed"], "gate_prob": pytest.approx(d["gate_prob"], abs=1e-6)} | {
                "abstained": d["abstained"],
                "outside": d["outside"],
                "persona": None,  # a binary artifact's unnamed adapter
                "persona_prob": d["persona_prob"],
            }
            assert headers["X-Prism-Abstained"] == ("true" if d["abstained"] else "false")
            assert headers["X-Prism-Outside"] == ("true" if d["outside"] else "false")


def test_route_only_reports_abstained(gated):
    from prism_persona.gated.router import load_router
    from prism_persona.serve.upstream import Forwarder

    art, gm = gated
    router = load_router(str(art), device="cpu", dtype="float32")
    with FakeOpenAIServer(reply=lambda body: f"from {body['model']}") as up:
        opts = ServeOptions(port=0, base_name="base", lora_name="lora", upstream=up.url)
        with PrismServer(GatedBackend(router), opts, Forwarder(up.url, api_key="k", timeout_s=20)).start() as srv:
            headers, prism = ask(srv, FAR)
            assert prism["abstained"] is True and prism["outside"] is True and prism["routed"] is False
            assert headers["X-Prism-Upstream-Model"] == "base" and headers["X-Prism-Abstained"] == "true"
            assert headers["X-Prism-Outside"] == "true"
            # forced on: the gate's abstain decision is still reported, the routing is the forced one
            body = {"model": "m", "messages": [{"role": "user", "content": FAR}], "prism": {"force": True}}
            _, _, resp = http_request(srv, "POST", "/v1/chat/completions", body)
            assert resp["prism"]["routed"] is True and resp["prism"]["abstained"] is True
            assert resp["prism"]["outside"] is True
    assert [b["model"] for b in up.bodies] == ["base", "lora"]


def test_a_gate_without_a_region_reports_no_abstained(tiny_model_dir, tmp_path):
    from prism_persona.gated.model import GatedModel

    gm = GatedModel.from_pretrained(make_tiny_artifact(tiny_model_dir, tmp_path / "p"), device="cpu", dtype="float32")
    with serve_fake(gm) as srv:
        headers, prism = ask(srv, FAR)
    assert set(prism) == {"routed", "gate_prob", "persona", "persona_prob"} and "X-Prism-Abstained" not in headers
    assert "X-Prism-Outside" not in headers


def test_generate_rows_and_chat_line_say_abstained(monkeypatch, capsys):
    from prism_persona.commands.chat import converse
    from prism_persona.serve.offline import routing_fields

    meta = {"routed": False, "gate_prob": 0.93, "abstained": True}
    assert routing_fields(Completion("x", meta=meta)) == meta
    below = {"routed": False, "gate_prob": 0.2, "abstained": False, "outside": True}  # outside, p below t
    assert routing_fields(Completion("x", meta=below)) == below
    assert routing_fields(Completion("x", meta={"routed": True, "gate_prob": 0.9})) == {
        "routed": True,
        "gate_prob": 0.9,
    }
    monkeypatch.setattr("sys.stdin", io.StringIO("what is the history of printing?\n"))
    converse("", None, lambda chat, force: Completion("an answer", meta=meta))
    out = capsys.readouterr().out
    assert "[routing: persona LoRA off (gate p=0.93, abstained" in out and "prism> an answer" in out
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    converse(
        "", None, lambda chat, force: Completion("hi", meta={"routed": False, "gate_prob": 0.2, "abstained": False})
    )
    assert "abstained" not in capsys.readouterr().out
