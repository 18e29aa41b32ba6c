"""The known-effect check on the embedded model (issue 13): a pirate persona that the rule judge in
prism_persona.kits.style:judge rewards on 'stories' and penalises on 'cooking'. Trained on hand-written
queries, measured on separate hand-written held-out queries (the style kit's heldout.jsonl): the gate
must route stories and not cooking, the LoRA (no persona in the prompt) must carry the pirate voice,
and every unrouted answer must be token-identical to the base model's.

Thresholds, set from the measurement of exactly this test (docs/method-check.md: stories routed
0.75, cooking 0.00, AUC 0.995, transfer ratio on stories 0.83, base identity 100%, about 7 min on a
loaded 2-core CPU): held-out routing >= 0.6 on stories and <= 0.2 on cooking, gate AUC >= 0.9,
transfer ratio on stories >= 0.5, base identity 100%. With 30 training queries per domain and
48-token answers (the README run) stories were routed 100 %. Sized for a 2-core CPU: 16 training
queries per domain, 32-token answers, 15 distillation steps, the first 10 held-out queries per domain
(2026-12-08, idle, 2 threads: stories routed 0.9, cooking 0.0, AUC 0.97, transfer 0.67 -- 4 LoRA wins
against 6 persona wins, one query above the bound --, base identity 11/11; 78 s; with 30 steps transfer
1.0 in 95 s; with 30 steps and all 40 held-out queries 153 s in the test command).
"""

from __future__ import annotations

import json

import pytest

from prism_persona.kits import kit_path

KIT = kit_path("style")


@pytest.mark.slow
def test_known_effect_on_held_out_queries(tmp_path):
    from prism_persona import config as C
    from prism_persona.options import merge
    from prism_persona.testing import first_per_domain, kit_run_overrides
    from prism_persona.train.pipeline import run_pipeline

    train = first_per_domain(KIT / "train_queries.jsonl", tmp_path / "train.jsonl", 16)
    kit = kit_run_overrides(
        tmp_path / "run", KIT, "pirate.txt", ["stories", "cooking"], train, 16, KIT / "heldout.jsonl", 32
    )
    # the style example's sizes: 15 distillation steps, the first 10 held-out queries per domain (30 steps
    # and all 40 queries took ~55 s more: 153 s in the test command, 2026-12-07)
    over = {"distill": {"loss": "kl+ce", "min_steps": 15}, "check": {"per_domain": 10}}
    cfg = C.resolve("tiny", overrides=merge(kit, over))
    out = run_pipeline(cfg)
    check_dir = tmp_path / "run" / "check"
    rep = json.loads((check_dir / "check.json").read_text())
    assert out["report"]["heldout_check"]["overall"] == rep["overall"]
    stories, cooking = rep["domains"]["stories"], rep["domains"]["cooking"]
    msg = json.dumps({k: rep[k] for k in ("overall", "domains", "gate_vs_expected_route")}, indent=1, default=str)
    assert stories["routing_rate"] >= 0.6, msg
    assert cooking["routing_rate"] <= 0.2, msg
    assert rep["gate_vs_expected_route"]["auc"] >= 0.9, msg
    assert stories["persona_win_rate"] > 0 and stories["transfer_ratio"] >= 0.5, msg
    assert rep["overall"]["unrouted"] > 0 and rep["overall"]["base_identity"] == 1.0, msg
    for name in ("check.json", "check.md", "check.png"):
        assert (check_dir / name).is_file()
