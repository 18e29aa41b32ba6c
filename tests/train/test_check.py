"""`prism check` on a tiny artifact: the four systems, a rule judge, base identity, resume, the report."""

from __future__ import annotations

import json

import pytest

from prism_persona.config import CheckConfig, JudgeConfig
from prism_persona.errors import PrismError
from prism_persona.store import JsonlStore
from prism_persona.testing import SPLIT_QUERIES, make_tiny_artifact
from prism_persona.text import is_loop
from prism_persona.train.check import HeldoutQuery, load_heldout, run_check, summarise


@pytest.mark.parametrize(
    "text, loop",
    [
        ("word, word, word, word, word", True),
        ("The sea is blue. The sea is blue. The sea is blue. The sea is blue.", True),
        ("I like the sea, the sea is blue, and the sky is blue too.", False),
        ("", False),
        ("Step 1: mix. Step 2: bake. Step 3: cool. Step 4: eat.", False),
    ],
)
def test_is_loop(text, loop):
    assert is_loop(text) is loop


def test_load_heldout_labels(tmp_path):
    f = tmp_path / "h.csv"
    f.write_text(
        "domain,query,route\nwriting,Write a limerick,yes\ncoding,Fix my loop,\ncoding,Sort a list,false\n"
        "coding,Sort a list,false\n",
        encoding="utf-8",
    )
    items = load_heldout(f)
    assert [(q.domain, q.route) for q in items] == [("writing", True), ("coding", None), ("coding", False)]
    assert [q.route for q in load_heldout(f, rewarded=["writing"])] == [True, False, False]
    with pytest.raises(PrismError, match="no held-out queries: law"):
        load_heldout(f, rewarded=["law"])
    f.write_text("domain,query,route\nwriting,x,maybe\n")
    with pytest.raises(PrismError, match="'route' must be true or false"):
        load_heldout(f)


def test_summarise_counts_wins_transfer_identity_and_auc(tmp_path):
    items = [HeldoutQuery(f"k{i}", "writing" if i < 2 else "coding", f"q{i}", i < 2) for i in range(4)]
    answers, verdicts = JsonlStore(tmp_path / "a.jsonl"), JsonlStore(tmp_path / "v.jsonl")
    probs = [0.9, 0.8, 0.3, 0.1]
    for i, q in enumerate(items):
        routed = probs[i] >= 0.5
        for s in ("base", "lora", "persona", "prism"):
            text = {"base": f"base {i}", "lora": f"lora {i}", "persona": f"persona {i}"}.get(s)
            if s == "prism":
                text = f"lora {i}" if routed else (f"base {i}" if i == 2 else "different")
            row = {"key": f"{s}:{q.key}", "text": text, "routed": routed, "gate_prob": probs[i]}
            if s == "prism" and i == 3:  # the gate abstained here (answers stored before issue 29 lack the key)
                row["abstained"] = True
            answers.append(row)
        verdicts.append({"key": f"lora_vs_base:{q.key}", "x_wins": i == 0})
        verdicts.append({"key": f"persona_vs_base:{q.key}", "x_wins": i < 2})
    rep = summarise(items, answers, verdicts, 0.5)
    w, o = rep["domains"]["writing"], rep["overall"]
    assert w["routing_rate"] == 1.0 and rep["domains"]["coding"]["routing_rate"] == 0.0
    assert w["lora_win_rate"] == 0.5 and w["persona_win_rate"] == 1.0 and w["transfer_ratio"] == 0.5
    assert rep["domains"]["coding"]["transfer_ratio"] is None  # the persona never won there
    assert o["unrouted"] == 2 and o["base_identity"] == 0.5
    assert rep["gate_vs_expected_route"]["auc"] == 1.0 and rep["gate_vs_expected_route"]["balanced_accuracy"] == 1.0
    assert o["loops_vs_base"]["lora"] == {"added": 0, "removed": 0, "p": 1.0}
    assert o["abstained"] == 1 and w["abstained"] == 0 and rep["domains"]["coding"]["abstained"] == 1


def test_paired_loops_counts_discordant_queries_and_tests_them():
    from prism_persona.train.check import paired_loops

    assert paired_loops([True, False, False, False], [True, True, True, False]) == {"added": 2, "removed": 0, "p": 0.5}
    six = paired_loops([False] * 20, [True] * 6 + [False] * 14)  # 6 new loops, none removed: not noise
    assert six["added"] == 6 and six["p"] == 2 / 2**6
    assert paired_loops([False, True], [True, False])["p"] == 1.0


def test_check_on_a_tiny_artifact_end_to_end(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from prism_persona.cli import main
    from prism_persona.gated.model import GatedModel

    art = make_tiny_artifact(tiny_model_dir, tmp_path / "built" / "prism")
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(
        "".join(
            json.dumps({"domain": "writing" if i % 2 else "coding", "query": q}) + "\n"
            for i, q in enumerate(SPLIT_QUERIES)
        )
    )
    persona = tmp_path / "persona.txt"
    persona.write_text("You are a pirate. Say arr.")
    judge = tmp_path / "rule_judge.py"
    judge.write_text(
        "def judge(query, a, b, domain):\n"
        "    assert domain in ('writing', 'coding')\n"
        "    return 'A' if len(a) > len(b) else 'B' if len(b) > len(a) else 'tie'\n"
    )
    out = tmp_path / "check"
    argv = [
        "check",
        "--prism",
        str(art),
        "--queries",
        str(heldout),
        "--rewarded",
        "writing",
        "--judge",
        f"{judge}:judge",
        "--persona-file",
        f"writing={persona}",
        "--persona-file",
        f"coding={persona}",
        "--max-new-tokens",
        "6",
        "--out",
        str(out),
        "--batch-size",
        "4",
        "-q",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "transfer ratio" in printed and "base identity" in printed
    rep = json.loads((out / "check.json").read_text())
    o = rep["overall"]
    assert o["n"] == 4 and 0 < o["routing_rate"] < 1  # the tiny gate splits these queries
    assert o["base_identity"] == 1.0  # unrouted rows of mixed batches are exactly the base model's
    assert rep["gate_vs_expected_route"]["n"] == 4
    verdicts = [json.loads(x) for x in (out / "verdicts.jsonl").read_text().splitlines()]
    assert all(v["winner"] != "unparseable" for v in verdicts)  # the judge got its domain argument
    assert (out / "check.png").stat().st_size > 1000 and "| writing |" in (out / "check.md").read_text()
    assert len((out / "answers.jsonl").read_text().splitlines()) == 16
    assert len((out / "verdicts.jsonl").read_text().splitlines()) == 8
    # resume: nothing is generated again
    monkeypatch.setattr(GatedModel, "generate", lambda *a, **k: pytest.fail("regenerated"))
    again = run_check(
        art,
        CheckConfig(queries=str(heldout), rewarded=["writing"], max_new_tokens=6),
        JudgeConfig(judge=f"{judge}:judge"),
        out,
        persona_files={"writing": str(persona), "coding": str(persona)},
        quiet=True,
        gated=GatedModel.from_pretrained(art, device="cpu", dtype="float32"),
    )
    assert again["overall"] == o


def test_check_needs_personas(tiny_model_dir, tmp_path):
    art = make_tiny_artifact(tiny_model_dir, tmp_path / "built" / "prism")
    heldout = tmp_path / "h.jsonl"
    heldout.write_text(json.dumps({"domain": "law", "query": "Can I sue my landlord?"}) + "\n")
    with pytest.raises(PrismError, match="no persona for held-out domain"):
        run_check(art, CheckConfig(queries=str(heldout)), JudgeConfig(), tmp_path / "c")
