"""RoutedEngine: the gate decides per row in process, each row goes to the served base or the LoRA."""

from __future__ import annotations

import math

import pytest

from prism_persona.engines.base import SamplingParams
from prism_persona.gated.routed import RoutedEngine


class KeywordRouter:
    """Routes chats whose first user turn mentions 'expert' (probability 0.9), else 0.2."""

    def __init__(self):
        self.calls = 0

    def route(self, chats):
        self.calls += 1
        first = [next(m["content"] for m in c if m["role"] == "user") for c in chats]
        return [(0.9, True) if "expert" in q else (0.2, False) for q in first]


CHATS = [
    [{"role": "user", "content": "as an expert, explain tides"}],
    [{"role": "user", "content": "hi"}],
    [
        {"role": "user", "content": "expert question"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "and a follow-up"},
    ],
]


@pytest.mark.parametrize("force, want", [(None, [True, False, True]), (True, [True] * 3), (False, [False] * 3)])
def test_rows_go_to_the_lora_or_the_base_as_routed(fake_engine, force, want):
    engine = RoutedEngine(fake_engine, KeywordRouter(), "prism", force=force)
    outs = engine.generate(CHATS, SamplingParams(max_new_tokens=4))
    assert [o.meta["routed"] for o in outs] == want
    assert [o.meta["gate_prob"] for o in outs] == [0.9, 0.2, 0.9]  # reported whatever force says
    assert [o.text.split(":")[0] for o in outs] == ["prism" if w else "tiny" for w in want]


def test_scores_each_row_on_its_routed_model(fake_engine, tmp_path):
    import json

    router = KeywordRouter()
    engine = RoutedEngine(fake_engine, router, "prism")
    scores = engine.score_choices(CHATS[:2], ["A", "B"])
    assert len(scores) == 2 and all(math.isfinite(s["A"]) and math.isfinite(s["B"]) for s in scores)
    bodies = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    prompt_model = {tuple(b["prompt"]): b["model"] for b in bodies}
    ids = [fake_engine.prompt_ids(c) for c in CHATS[:2]]
    assert [prompt_model[tuple(i)] for i in ids] == ["prism", "tiny"]
    assert engine.route(CHATS[:2]) == [(0.9, True), (0.2, False)] and engine.can_score


class AbstainingRouter(KeywordRouter):
    """A router whose gate holds an abstain region: "hi" lies outside it (probability 0.9, not routed)."""

    has_abstain = True

    def decisions(self, chats):
        out = []
        for p, r in self.route(chats):
            out.append({"gate_prob": p, "routed": r, "abstained": False, "outside": False})
        out[1] = {"gate_prob": 0.9, "routed": False, "abstained": True, "outside": True}
        return out


def test_an_abstaining_router_reports_it_and_sends_the_row_to_the_base(fake_engine):
    outs = RoutedEngine(fake_engine, AbstainingRouter(), "prism").generate(CHATS, SamplingParams(max_new_tokens=4))
    assert [o.meta["abstained"] for o in outs] == [False, True, False]
    assert [o.meta["outside"] for o in outs] == [False, True, False]  # the router's one decision, carried
    assert [o.meta["routed"] for o in outs] == [True, False, True]
    assert [o.text.split(":")[0] for o in outs] == ["prism", "tiny", "prism"]
    # scored rows (MMLU): the same meta, from the plan the rows were scored by
    scores, metas = RoutedEngine(fake_engine, AbstainingRouter(), "prism").score_choices_meta(CHATS, ["A", "B"])
    assert len(scores) == 3 and metas == [{k: o.meta[k] for k in metas[0]} for o in outs]
    assert [m["outside"] for m in metas] == [False, True, False]
    # a router without a region reports the two fields it always did
    plain = RoutedEngine(fake_engine, KeywordRouter(), "prism").generate(CHATS, SamplingParams(max_new_tokens=4))
    assert all(set(o.meta) >= {"routed", "gate_prob"} and not {"abstained", "outside"} & set(o.meta) for o in plain)
