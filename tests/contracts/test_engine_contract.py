"""The contract every :class:`~prism_persona.engines.base.Engine` keeps, checked on each implementation.

:class:`EngineContract` holds the tests; each implementation's class inherits it and provides an
``engine`` fixture (PEFT's common-tester style). Adding an engine = one more class here.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from dataclasses import replace

import pytest

from prism_persona.engines.base import Completion, Engine, SamplingParams
from prism_persona.engines.hf import HFEngine
from prism_persona.engines.openai import OpenAIEngine
from prism_persona.engines.vllm import VLLMEngine
from prism_persona.gated.model import GatedEngine, GatedModel
from prism_persona.gated.routed import RoutedEngine
from prism_persona.judges import CallableEngine
from prism_persona.testing import FakeOpenAIServer, ScriptedEngine, make_tiny_artifact

CHATS = [
    [{"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "As an expert, explain in two sentences why the sky is blue at noon."}],
    [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Write a haiku about the sea"},
    ],
]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)
CHOICES = ["A", "B"]


def first_stop_string(text: str):
    """(index, character) of a non-space character whose first occurrence is past the text's start."""
    for k, ch in enumerate(text):
        if k > 0 and not ch.isspace() and text.index(ch) == k:
            return k, ch
    return None


class EngineContract:
    """What every engine promises. Subclasses provide the ``engine`` fixture and may set:

    ``scripted``: the text does not come from a model (a test double or a user function returning
    what it is given), so stop strings and ``max_new_tokens`` do not apply to it.
    :meth:`sent_max_tokens`: for an engine whose server generates, the ``max_tokens`` it was asked
    for (a stand-in server does not generate, so the limit is checked on the request).
    """

    scripted = False
    engine_class: type = Engine

    def sent_max_tokens(self, engine) -> list[int] | None:
        return None

    def test_is_an_engine_with_a_name(self, engine):
        assert type(engine) is self.engine_class and engine.name and isinstance(engine.model_name, str)

    def test_one_completion_per_chat_in_order(self, engine):
        outs = engine.generate(CHATS, GREEDY)
        assert len(outs) == len(CHATS) and all(isinstance(o, Completion) for o in outs)
        for o in outs:
            assert isinstance(o.text, str) and isinstance(o.meta, dict)
            assert o.finish_reason in ("stop", "length") and o.num_tokens >= 0
        singles = [engine.generate([chat], GREEDY)[0].text for chat in CHATS]
        assert len(set(singles)) > 1, "the chats must be told apart for the order to be observable"
        assert [o.text for o in outs] == singles
        assert engine.generate([], GREEDY) == []

    def test_temperature_0_is_deterministic(self, engine):
        first = [o.text for o in engine.generate(CHATS, GREEDY)]
        assert [o.text for o in engine.generate(CHATS, GREEDY)] == first

    def test_stop_strings_cut_the_text_before_the_first_one(self, engine):
        if self.scripted:
            pytest.skip("returns the text it is given: no generation to stop")
        for chat in CHATS:
            full = engine.generate([chat], GREEDY)[0].text
            cut = first_stop_string(full)
            if cut is None:
                continue
            k, stop = cut
            out = engine.generate([chat], replace(GREEDY, stop=(stop,)))[0]
            assert out.text == full[:k].strip() and out.finish_reason == "stop", (full, stop)
            return
        pytest.fail("no generation long enough to place a stop string in")

    def test_max_new_tokens_bounds_the_generation(self, engine):
        if self.scripted:
            pytest.skip("returns the text it is given: no generation to bound")
        short = engine.generate(CHATS, replace(GREEDY, max_new_tokens=2))
        sent = self.sent_max_tokens(engine)
        if sent is not None:
            assert sent[-len(CHATS) :] == [2] * len(CHATS)
            return
        assert all(o.num_tokens <= 2 for o in short)
        assert any(o.finish_reason == "length" for o in short)
        assert max(o.num_tokens for o in engine.generate(CHATS, GREEDY)) > 2  # the limit is what bound it

    def test_score_choices_is_none_or_log_probabilities(self, engine):
        scores = engine.score_choices(CHATS, CHOICES)
        if scores is None:
            assert not engine.can_score
            return
        assert engine.can_score and len(scores) == len(CHATS)
        for row in scores:
            assert set(row) == set(CHOICES)
            assert all(isinstance(v, float) and not math.isnan(v) and v <= 1e-6 for v in row.values()), row
        alone = engine.score_choices([CHATS[1]], CHOICES)[0]
        assert alone == pytest.approx(scores[1], abs=1e-3)  # a row's scores do not depend on its batch

    def test_close_twice_is_harmless(self, engine):
        engine.generate(CHATS[:1], GREEDY)
        engine.close()
        engine.close()


# ------------------------------------------------------------------------------------- in process


class TestHFEngine(EngineContract):
    engine_class = HFEngine

    @pytest.fixture
    def engine(self, tiny_model):
        model, tok = tiny_model
        return HFEngine(model, tok, batch_size=2, quiet=True)


@pytest.fixture(scope="module")
def tiny_gated(tiny_model_dir, tmp_path_factory):
    artifact = make_tiny_artifact(tiny_model_dir, tmp_path_factory.mktemp("contract") / "prism")
    gated = GatedModel.from_pretrained(artifact, device="cpu", dtype="float32", batch_size=2)
    yield gated
    gated.close()


class TestGatedEngine(EngineContract):
    engine_class = GatedEngine

    @pytest.fixture
    def engine(self, tiny_gated):
        return tiny_gated.as_engine()

    def test_every_completion_says_how_it_was_routed(self, engine):
        for o in engine.generate(CHATS, GREEDY):
            assert isinstance(o.meta["routed"], bool) and 0.0 <= o.meta["gate_prob"] <= 1.0


# --------------------------------------------------------------------------------------- over HTTP


def reply_by_length(body: dict) -> str:
    """The stand-in OpenAI server's answer: depends on the chat, so the order is observable."""
    return f"echo {sum(len(m['content']) for m in body['messages'])} chars"


class TestOpenAIEngine(EngineContract):
    engine_class = OpenAIEngine

    @pytest.fixture
    def engine(self):
        server = FakeOpenAIServer(logprobs=True, reply=reply_by_length)
        eng = OpenAIEngine(server.url, "served-model", backoff_s=0.01)
        eng.fake_server = server
        yield eng
        eng.close()
        server.close()

    def sent_max_tokens(self, engine) -> list[int]:
        return [b["max_tokens"] for b in engine.fake_server.bodies if not b.get("logprobs")]


def vllm_requests() -> list[dict]:
    with open(os.environ["FAKE_VLLM_REQUESTS"], encoding="utf-8") as f:
        return [json.loads(line) for line in f]


class TestVLLMEngine(EngineContract):
    """Against the stand-in vLLM server (tests/fixtures/fake_vllm); tests/integration runs real vLLM."""

    engine_class = VLLMEngine

    @pytest.fixture
    def engine(self, fake_engine):
        return fake_engine

    def sent_max_tokens(self, engine) -> list[int]:
        return [b["max_tokens"] for b in vllm_requests() if "allowed_token_ids" not in b]


class ExpertRouter:
    """Routes chats whose first user turn mentions 'expert'."""

    def route(self, chats):
        first = [next(m["content"] for m in c if m["role"] == "user") for c in chats]
        return [(0.9, True) if "expert" in q.lower() else (0.2, False) for q in first]


class TestRoutedEngine(TestVLLMEngine):
    engine_class = RoutedEngine

    @pytest.fixture
    def engine(self, fake_engine):
        return RoutedEngine(fake_engine, ExpertRouter(), "prism")


# ------------------------------------------------------------------------- doubles and user functions


class TestScriptedEngine(EngineContract):
    scripted = True
    engine_class = ScriptedEngine

    @pytest.fixture
    def engine(self):
        return ScriptedEngine(
            responder=lambda chat: "echo " + chat[-1]["content"],
            scorer=lambda chat, choices: {c: -1.0 - i - len(chat) for i, c in enumerate(choices)},
        )


class TestCallableEngine(EngineContract):
    scripted = True
    engine_class = CallableEngine

    @pytest.fixture
    def engine(self):
        return CallableEngine(lambda prompt: f"{len(prompt)} characters")


# ------------------------------------------------------------------------------------------ coverage


def subclasses(cls: type) -> set:
    return {s for sub in cls.__subclasses__() for s in {sub} | subclasses(sub)}


def test_every_engine_in_the_package_has_a_contract_class():
    """A new Engine anywhere in prism_persona fails here until its class above inherits the contract."""
    import pkgutil

    import prism_persona
    from prism_persona.testing import BootstrapEngine

    for mod in pkgutil.walk_packages(prism_persona.__path__, "prism_persona."):
        importlib.import_module(mod.name)
    engines = {c for c in subclasses(Engine) if c.__module__.startswith("prism_persona.")}
    tested = {c.engine_class for c in subclasses(EngineContract)}
    assert engines - {BootstrapEngine} == tested  # BootstrapEngine: the ScriptedEngine with the bootstrap's script
