"""A K-way artifact in the GatedModel: each answer names its persona with the gate's probability, a
persona can be forced by name, and a multi-turn chat keeps its first turn's persona."""

from __future__ import annotations

import pytest
import torch

from prism_persona.engines.base import SamplingParams
from prism_persona.gated.model import GatedModel
from prism_persona.models import encode_prompts, render_chat
from prism_persona.testing import SPLIT_QUERIES, make_tiny_artifact

NAMES = ("story", "monitor")
P = SamplingParams(max_new_tokens=3)


def chat(q):
    return [{"role": "user", "content": q}]


@pytest.fixture(scope="module")
def kway(tiny_model_dir, tmp_path_factory):
    art = make_tiny_artifact(tiny_model_dir, tmp_path_factory.mktemp("kway") / "prism", personas=NAMES)
    gm = GatedModel.from_pretrained(art, device="cpu", dtype="float32")
    yield gm
    gm.close()


@pytest.fixture(scope="module")
def binary(tiny_model_dir, tmp_path_factory):
    art = make_tiny_artifact(tiny_model_dir, tmp_path_factory.mktemp("bin") / "prism")
    gm = GatedModel.from_pretrained(art, device="cpu", dtype="float32")
    yield gm
    gm.close()


def test_each_answer_names_its_persona(kway):
    chats = [chat(q) for q in SPLIT_QUERIES]
    decided = kway.decisions(chats)
    metas = [c.meta for c in kway.generate(chats, P)]
    # the tiny artifact sends query i to class i mod 3: base, story, monitor, base
    assert [m["persona"] for m in metas] == [None, "story", "monitor", None]
    assert [m["routed"] for m in metas] == [False, True, True, False]
    assert [m["persona"] for m in metas] == [d["persona_name"] for d in decided]
    for m, d in zip(metas, decided):
        assert m["persona_prob"] == d["persona_prob"]
        if m["routed"]:  # the routed persona's own class probability, not the routing probability
            k = NAMES.index(m["persona"])
            assert 0.5 < m["persona_prob"] <= m["gate_prob"] + 1e-6
            assert d["persona"] == k
        else:
            assert m["persona_prob"] is None


def _last_logits(gm, q, force):
    enc = encode_prompts(gm.tokenizer, [render_chat(gm.tokenizer, chat(q))], gm.device)
    logits, _, routed = gm.forward_logits(enc["input_ids"], enc["attention_mask"], force=force)
    return logits[0, -1], bool(routed[0])


def test_force_a_persona_by_name(kway):
    q = SPLIT_QUERIES[1]  # the gate picks story
    gate, _ = _last_logits(kway, q, None)
    story, _ = _last_logits(kway, q, "story")
    monitor, on = _last_logits(kway, q, "monitor")
    base, _ = _last_logits(kway, q, False)
    assert on
    assert torch.equal(gate, story)  # forcing the persona the gate picks changes nothing
    assert not torch.allclose(monitor, story)  # the other persona's adapter runs
    assert not torch.allclose(monitor, base)
    meta = kway.generate([chat(q)], P, force="monitor")[0].meta
    assert meta["routed"] and meta["persona"] == "monitor"
    assert meta["persona_prob"] == pytest.approx(float(kway.class_probs[0, 1 + NAMES.index("monitor")]), abs=1e-6)
    assert meta["persona_prob"] < 0.5  # the gate's probability of the forced persona, reported as is
    # per-row forcing: one row forced to a persona, one off, one left to the gate
    metas = [c.meta for c in kway.generate([chat(q) for q in SPLIT_QUERIES[:3]], P, force=["monitor", False, None])]
    assert [m["persona"] for m in metas] == ["monitor", None, "monitor"]


def test_unknown_persona_is_one_line(kway, binary):
    with pytest.raises(ValueError, match=r"unknown persona 'poet'; this artifact's personas: story, monitor$"):
        kway.generate([chat("hi")], P, force="poet")
    with pytest.raises(ValueError, match="has no name; force it with 'on'"):
        binary.generate([chat("hi")], P, force="story")


def test_multi_turn_chat_keeps_its_first_turns_persona(kway):
    first = SPLIT_QUERIES[2]  # monitor
    conversation = [*chat(first), {"role": "assistant", "content": "ok"}, *chat(SPLIT_QUERIES[1])]  # then story
    meta = kway.generate([conversation], P)[0].meta
    assert meta["persona"] == "monitor"
    assert meta["persona_prob"] == kway.decisions([chat(first)])[0]["persona_prob"]
    assert int(kway.state.persona[0]) == NAMES.index("monitor")  # the artifact's adapter order is NAMES


def test_binary_artifact_reports_no_persona_name(binary):
    metas = [c.meta for c in binary.generate([chat(q) for q in SPLIT_QUERIES], P)]
    assert any(m["routed"] for m in metas) and not all(m["routed"] for m in metas)
    for m in metas:
        assert m["persona"] is None
        assert m["persona_prob"] == (round(m["gate_prob"], 6) if m["routed"] else None)


# ------------------------------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def kway_dir(tiny_model_dir, tmp_path_factory):
    return make_tiny_artifact(tiny_model_dir, tmp_path_factory.mktemp("kway") / "prism", personas=NAMES)


def _generate(art, tmp_path, *extra):
    import json

    from prism_persona import cli

    tmp_path.mkdir(parents=True, exist_ok=True)
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in SPLIT_QUERIES))
    rc = cli.main(
        [
            "generate",
            "--prism",
            str(art),
            "--input",
            str(src),
            "--output",
            str(out),
            "--max-new-tokens",
            "2",
            "-q",
            *extra,
        ]
    )
    return rc, [json.loads(line) for line in out.read_text().splitlines()] if rc == 0 else []


def test_generate_writes_each_rows_persona(kway_dir, tmp_path, capsys):
    rc, rows = _generate(kway_dir, tmp_path)
    assert rc == 0
    assert "(2 routed to the persona LoRA: story 1, monitor 1)" in capsys.readouterr().err
    assert [r["persona"] for r in rows] == [None, "story", "monitor", None]
    assert all((r["persona_prob"] is None) == (not r["routed"]) for r in rows)
    rc, rows = _generate(kway_dir, tmp_path / "forced", "--force", "monitor")
    assert rc == 0 and [r["persona"] for r in rows] == ["monitor"] * 4 and all(r["routed"] for r in rows)


def test_force_an_unknown_persona_is_one_line_before_loading(kway_dir, tmp_path, capsys, monkeypatch):
    from prism_persona.gated import model as gated_model
    from prism_persona.testing import one_error_line

    monkeypatch.setattr(gated_model, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    rc, _ = _generate(kway_dir, tmp_path, "--force", "poet")
    assert rc != 0
    assert one_error_line(capsys).endswith(
        "--force poet: unknown persona 'poet'; this artifact's personas: story, monitor"
    )


def test_chat_names_the_conversations_persona(kway_dir, monkeypatch, capsys):
    import io
    import sys

    from prism_persona import cli

    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{SPLIT_QUERIES[2]}\n{SPLIT_QUERIES[1]}\n/quit\n"))
    assert cli.main(["chat", "--prism", str(kway_dir), "--max-new-tokens", "2", "-q"]) == 0
    out = capsys.readouterr().out
    assert "[routing: persona monitor ON (gate p=1.00, p=1.00)]" in out
    assert out.count("[routing:") == 1  # once per conversation: the second turn keeps monitor
