"""`--refusal-classifier hf:MODEL` on a tiny random sequence classifier built and saved here (no downloads)."""

from __future__ import annotations

import json

import pytest

from prism_persona.errors import PrismError
from prism_persona.evals.settings import EvalConfig
from prism_persona.judges import make_refusal_classifier
from prism_persona.judges.hf_classifier import HFClassifierRefusal, refusal_index

RESPONSES = ["I'm sorry, but I can't help with that.", "Sure! Step one: preheat the oven.", "No.", "x" * 300]


def _tiny_classifier(path, labels=("NORMAL", "REJECTION")):
    import torch
    from transformers import AutoModelForSequenceClassification, RobertaConfig

    from prism_persona.testing import make_tokenizer

    tok = make_tokenizer()
    cfg = RobertaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=600,
        pad_token_id=tok.pad_token_id,
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
    )
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg)
    with torch.no_grad():  # larger than default init, so P(refusal) depends clearly on the text
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    # a tokenizer that pads on the left (as generation wants): the classifier must still pad on the right
    cfg_file = path / "tokenizer_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "padding_side": "left"}))
    return path


@pytest.fixture(scope="module")
def clf_dir(tmp_path_factory):
    return _tiny_classifier(tmp_path_factory.mktemp("clf"))


def _alone(clf: HFClassifierRefusal, text: str) -> float:
    """P(refusal) of one response classified on its own (no padding)."""
    import torch

    enc = clf.tokenizer([text], truncation=True, max_length=clf.max_length, return_tensors="pt")
    with torch.no_grad():
        return float(torch.softmax(clf.model(**enc).logits, -1)[0, clf.index])


def test_label_from_id2label_and_batched_decisions_match_one_by_one(clf_dir):
    clf = make_refusal_classifier(f"hf:{clf_dir}", lambda: None, EvalConfig(batch_size=3, device="cpu"))
    assert isinstance(clf, HFClassifierRefusal)
    assert clf.identity == {"classifier": f"hf:{clf_dir}", "refusal_label": "REJECTION"} and clf.index == 1
    out = clf.classify(["q"] * len(RESPONSES), RESPONSES)  # two batches, padded
    assert [r["method"] for r in out] == ["classifier"] * 4
    for r, text in zip(out, RESPONSES):
        assert r["p_refusal"] == pytest.approx(_alone(clf, text), abs=2e-4)
        assert r["refused"] == (r["label"] == "REJECTION") == (r["p_refusal"] > 0.5)
    assert max(r["p_refusal"] for r in out) - min(r["p_refusal"] for r in out) > 0.05  # the text matters


def test_refusal_label_flag_flips_the_meaning(clf_dir):
    default = make_refusal_classifier(f"hf:{clf_dir}", lambda: None, EvalConfig(device="cpu"))
    flipped = make_refusal_classifier(f"hf:{clf_dir}", lambda: None, EvalConfig(device="cpu", refusal_label="0"))
    assert flipped.identity["refusal_label"] == "NORMAL"
    a, b = default.classify(RESPONSES, RESPONSES), flipped.classify(RESPONSES, RESPONSES)
    assert [x["refused"] for x in a] == [not y["refused"] for y in b]


def test_unnamed_labels_and_missing_models_are_one_line_errors(tmp_path):
    with pytest.raises(PrismError, match="0=LABEL_0, 1=LABEL_1: pass --refusal-label"):
        refusal_index({0: "LABEL_0", 1: "LABEL_1"}, None)
    assert refusal_index({"0": "LABEL_0", "1": "LABEL_1"}, "label_1") == 1
    with pytest.raises(PrismError, match="--refusal-label refused: the classifier's labels are 0=ok, 1=no"):
        refusal_index({0: "ok", 1: "no"}, "refused")
    with pytest.raises(PrismError, match="cannot load the classifier"):
        make_refusal_classifier(f"hf:{tmp_path / 'nothing'}", lambda: None, EvalConfig())


def test_eval_uses_the_classifier_and_names_it(tmp_path, clf_dir):
    from pathlib import Path

    from prism_persona.cli import main

    fix = Path(__file__).resolve().parents[1] / "fixtures"
    out = tmp_path / "ev"
    args = ["eval", "--model", str(clf_dir.parent / "m"), "--benchmarks", "jailbreak", "--jailbreak"]
    args += [str(fix / "jailbreak_small.json"), "--refusal-classifier", f"hf:{clf_dir}", "--out", str(out), "-q"]
    from prism_persona.testing import make_tiny_model

    make_tiny_model(clf_dir.parent / "m")
    args += ["--systems", "base", "--safety-tokens", "4", "--resamples", "10", "--device", "cpu"]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["refusal_classifier"]["classifier"] == f"hf:{clf_dir}"
    assert res["safety"]["base"]["jailbreak"]["method"] == {"classifier": 2}
    judged = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert all("p_refusal" in j for j in judged) and len(judged) == 2
