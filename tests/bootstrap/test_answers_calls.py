"""The answers stage sizes its engine calls: the in-process engine's batch, a server engine's requests
in flight (so vLLM's continuous batching is fed instead of draining after every small call)."""

from __future__ import annotations

from prism_persona import config as C
from prism_persona.bootstrap.answers import STREAM_BATCHES, chunk_size, write_answers
from prism_persona.engines.openai import OpenAIEngine
from prism_persona.store import RunDir
from prism_persona.testing import FakeOpenAIServer, ScriptedEngine

PERSONAS = {"code": {"short": "You are an expert programmer."}}


def _queries(n: int) -> list[dict]:
    return [{"key": f"q{i}", "domain": "code", "query": f"question {i}?"} for i in range(n)]


def _cfg(tmp_path, batch_size: int):
    return C.resolve(
        overrides={
            "out": str(tmp_path / "run"),
            "quiet": True,
            "persona": {"domains": ["code"]},
            "model": {"batch_size": batch_size},
        }
    )


class CallSizes(ScriptedEngine):
    def __init__(self, preferred: int = 0, refills_rows: bool = True):
        super().__init__(responder=lambda chat: "an answer")
        self.preferred_call_size = preferred
        self.refills_rows = refills_rows
        self.sizes: list[int] = []

    def generate(self, chats, params, desc=""):
        self.sizes.append(len(chats))
        return super().generate(chats, params, desc)


def test_in_process_engine_calls_carry_a_stream_of_batches(tmp_path):
    cfg = _cfg(tmp_path, batch_size=4)
    engine = CallSizes()
    assert STREAM_BATCHES > 1
    per_call = STREAM_BATCHES * 4  # chats: queries x (base, persona), streamed through one cache
    n = 2 * per_call // 2 + 3
    assert write_answers(cfg, RunDir(cfg.out), lambda: engine, PERSONAS, _queries(n)) == n
    assert engine.sizes == [per_call, per_call, 6]


def test_an_engine_that_does_not_refill_rows_gets_one_batch_per_call(tmp_path):
    cfg = _cfg(tmp_path, batch_size=4)
    engine = CallSizes(refills_rows=False)
    assert chunk_size(cfg.model.batch_size, engine) == 2 and chunk_size(cfg.model.batch_size) == 2
    assert write_answers(cfg, RunDir(cfg.out), lambda: engine, PERSONAS, _queries(5)) == 5
    assert engine.sizes == [4, 4, 2]


def test_server_engine_calls_carry_its_requests_in_flight(tmp_path):
    cfg = _cfg(tmp_path, batch_size=4)
    engine = CallSizes(preferred=12)
    assert chunk_size(cfg.model.batch_size, engine) == 6
    assert write_answers(cfg, RunDir(cfg.out), lambda: engine, PERSONAS, _queries(9)) == 9
    assert engine.sizes == [12, 6]


def test_openai_engine_keeps_its_concurrency_in_flight_during_the_answers_stage(tmp_path):
    cfg = _cfg(tmp_path, batch_size=2)  # one query (two chats) per call before server engines had their own size
    with FakeOpenAIServer(delay=0.2) as srv:
        engine = OpenAIEngine(srv.url, "m", concurrency=8)
        assert engine.preferred_call_size == 8
        assert write_answers(cfg, RunDir(cfg.out), lambda: engine, PERSONAS, _queries(8)) == 8
        engine.close()
        assert len(srv.bodies) == 16 and srv.max_inflight > 2
