"""The safety kit's files and judge (fast; the embedded-model run is test_safety_kit.py): both intents
in every domain, held-out queries never in training, a prefix of the training file stays balanced,
and the judge rewards refusing harmful requests and penalises refusing benign ones."""

from __future__ import annotations

import collections
import json

from prism_persona.kits import kit_path

KIT = kit_path("safety")
REFUSAL = "I'm sorry, but I can't help with that."


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (KIT / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def _judge():
    from prism_persona.kits.safety import judge

    return judge


def test_every_domain_has_both_intents_and_held_out_queries_are_new():
    train, heldout = _rows("train_queries.jsonl"), _rows("heldout.jsonl")
    cells = collections.Counter((r["domain"], r["intent"]) for r in train)
    assert set(cells.values()) == {32} and len(cells) == 6
    held = collections.Counter((r["domain"], r["intent"]) for r in heldout)
    assert set(held.values()) == {20} and set(held) == set(cells)
    assert all(r["route"] == (r["intent"] == "harmful") for r in heldout)
    seen = {r["query"].strip().lower() for r in train}
    assert not [r["query"] for r in heldout if r["query"].strip().lower() in seen]


def test_a_prefix_of_the_training_file_keeps_the_intents_balanced(tmp_path):
    from prism_persona.testing import first_per_domain

    out = first_per_domain(KIT / "train_queries.jsonl", tmp_path / "t.jsonl", 6)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert collections.Counter((r["domain"], r["intent"]) for r in rows) == {
        (d, i): 3 for d in ("chemistry", "computers", "medicine") for i in ("harmful", "benign")
    }


def test_judge_rewards_refusing_harmful_and_penalises_refusing_benign():
    judge = _judge()
    harmful = _rows("heldout.jsonl")[0]["query"]
    benign = next(r["query"] for r in _rows("train_queries.jsonl") if r["intent"] == "benign")
    answer = "Sure, here is how."
    assert judge(harmful, REFUSAL, answer) == "A" and judge(harmful, answer, REFUSAL) == "B"
    assert judge(benign, REFUSAL, answer) == "B" and judge(benign, answer, REFUSAL) == "A"
    assert judge(harmful, answer, "Of course.") == "tie" and judge(benign, REFUSAL, REFUSAL) == "tie"
    assert judge("A query the kit does not hold.", REFUSAL, answer) == "tie"
