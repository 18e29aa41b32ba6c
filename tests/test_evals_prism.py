"""`prism eval` with a real (tiny) PRISM artifact: lora, prism and oracle systems, routing per category."""

from __future__ import annotations

import json
from pathlib import Path

from prism_persona.cli import main

FIX = Path(__file__).parent / "fixtures"


def _tiny_artifact(model_dir, out: Path) -> Path:
    """A gated artifact on the tiny model: random non-zero LoRA on layers 1..L-1, random gate."""
    import torch
    from peft import LoraConfig, get_peft_model

    from prism_persona.artifact import write_artifact
    from prism_persona.gate import Gate, GateBundle, query_features
    from prism_persona.models import load_model

    base, tok = load_model(str(model_dir), dtype="float32", device="cpu")
    feats = query_features(base, tok, ["Write a haiku about rain.", "What is 12 * 12?", "hello", "fix my code"])
    torch.manual_seed(0)
    gate = Gate(feats.shape[1])
    gate.set_standardisation(feats)
    gate.eval()
    probs = sorted(gate(feats).tolist())
    bundle = GateBundle(gate=gate, threshold=(probs[1] + probs[2]) / 2, info={"metrics": {}})
    n = base.config.num_hidden_layers
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, layers_to_transform=list(range(1, n)),
                     target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    pm = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    pm.save_pretrained(out.parent / "adapter")
    return write_artifact(out, model_spec=str(model_dir), gate=bundle, adapter_dir=out.parent / "adapter")


def test_eval_with_prism_artifact(tmp_path, monkeypatch, tiny_model_dir):
    art = _tiny_artifact(tiny_model_dir, tmp_path / "run" / "prism")
    (tmp_path / "myjudge2.py").write_text(
        "def judge(prompt):\n"
        "    if 'yes or no' in prompt:\n        return 'no'\n"
        "    if '[[A]]' in prompt:\n        return '[[A]]'\n"
        "    return '[[5]]' if 'haiku' in prompt else '[[3]]'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["eval", "--prism", str(art), "--systems", "base,lora,prism,oracle", "--judge", "myjudge2:judge",
            "--benchmarks", "mmlu,mtbench,pku", "--mmlu", str(FIX / "mmlu_hf.jsonl"), "--mtbench",
            str(FIX / "mtbench_small.jsonl"), "--pku", str(FIX / "pku_small.json"), "--limit", "3",
            "--answer-tokens", "3", "--safety-tokens", "3", "--resamples", "50", "--out", str(tmp_path / "ev"), "-q"]
    assert main(args) == 0
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert res["systems"] == ["base", "lora", "prism", "oracle"]
    rt = res["mtbench"]["prism"]["routing"]
    assert rt["all"]["n"] == 6 and 0.0 <= rt["all"]["mean"] <= 1.0  # 3 questions x 2 turns
    assert res["mmlu"]["prism"]["routing"]["all"]["n"] == 3  # MMLU routing via GatedModel.route
    assert res["safety"]["prism"]["pku"]["routing"]["n"] == 3
    assert "routing" not in res["mtbench"]["lora"] and "routing" not in res["mtbench"]["base"]
    # oracle is never worse than base or lora
    for b in ("mmlu",):
        assert res[b]["oracle"]["accuracy"]["mean"] >= max(res[b]["base"]["accuracy"]["mean"],
                                                           res[b]["lora"]["accuracy"]["mean"])
    assert res["mtbench"]["oracle"]["score"]["mean"] >= res["mtbench"]["base"]["score"]["mean"] - 1e-9
    assert (tmp_path / "ev" / "routing.png").read_bytes().startswith(b"\x89PNG")
    # judges.ModelJudge's pairwise prompt gets '[[3]]' back from this callable: unreadable verdicts are
    # counted as unparseable and scored as ties, never as wins
    wr = res["mtbench"]["lora"]["win_rate"]
    assert wr["ties"] == 3 and wr["unparseable"] == 3 and wr["wins"] == wr["losses"] == 0 and wr["mean"] == 0.5
    recs = [json.loads(l) for l in (tmp_path / "ev" / "responses.jsonl").read_text().splitlines()]
    assert {r["system"] for r in recs} == {"base", "lora", "prism"}
