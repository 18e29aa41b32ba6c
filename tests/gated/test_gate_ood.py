"""Abstain on unfamiliar queries (issue 29): the gate's OOD region sends a query far from its training
features to the base model, on every routing path, and travels with the artifact."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from prism_persona.config import GateConfig
from prism_persona.engines.base import SamplingParams
from prism_persona.errors import PrismError
from prism_persona.gated.artifact import Artifact
from prism_persona.gated.features import gate_prompt, query_features
from prism_persona.gated.gate import Gate, GateBundle, OODRegion, decide
from prism_persona.gated.model import GatedModel
from prism_persona.models import encode_prompts
from prism_persona.testing import make_tiny_artifact
from prism_persona.train.gate import fit_ood, ood_reference_rows, train_gate

FAMILIAR = [
    "Write a short story about a brave little turtle.",
    "Tell me a story about a dragon who is afraid of the dark.",
    "Write a tale about two friends lost in a forest.",
    "Tell me a bedtime story about a sleepy bear.",
    "Write a story about a penguin who wants to fly.",
    "Tell me a story about a fox who learns to share.",
    "Write a short story about a lighthouse keeper.",
    "Tell me a story about a whale who sings to the moon.",
]
FAR = "9 ## 0x7f {} [] <<>> 42 %% 3.14159 ;; ~~ 1e9 ^^ 17 @@ 88 || 0b1011 && 256 ** 1024"


def blob(n: int, dim: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g) + shift


# ------------------------------------------------------------------------------------------- the region


@pytest.mark.parametrize("method", ["mahalanobis", "knn"])
def test_region_separates_far_points_and_decide_sends_them_to_the_base_model(method):
    x = blob(120, 16, 0)
    gate = Gate(16, [], dropout=0.0, pooling="mean")
    gate.set_standardisation(x)
    with torch.no_grad():
        gate.mlp[-1].weight.zero_()
        gate.mlp[-1].bias.fill_(3.0)  # p = 0.95 everywhere: only the abstain rule can say no
    region, info = fit_ood(gate, x, method, 0.99, 5)
    assert region is not None and info["method"] == method and info["crossfit_inside_rate"] >= 0.98
    gate.ood = region
    near, far = blob(50, 16, 1), blob(50, 16, 2, shift=6.0)
    p_near, r_near, a_near = decide(gate, 0.5, near)[:3]
    p_far, r_far, a_far = decide(gate, 0.5, far)[:3]
    assert a_far.all() and not r_far.any()  # far: abstained, never routed
    assert a_near.float().mean() <= 0.1 and torch.equal(r_near, ~a_near)
    torch.testing.assert_close(p_far, gate(far))  # the probability is reported as is
    # without the region the same gate routes everything
    gate.ood = None
    assert decide(gate, 0.5, far)[1].all() and not decide(gate, 0.5, far)[2].any()


def test_mahalanobis_low_rank_form_equals_the_dense_shrinkage_inverse():
    z = blob(10, 24, 3) * torch.linspace(0.2, 3.0, 24)  # n < dim: the covariance is singular
    r = OODRegion.fit("mahalanobis", z, k=5)
    assert 0 < r.alpha < 1 and r.rows <= 10
    x = z - z.mean(0)
    cov = (1 - r.alpha) * (x.T @ x / 10) + r.alpha * r.nu * torch.eye(24)
    q = blob(7, 24, 4)
    d = q - z.mean(0)
    want = torch.sqrt(torch.einsum("bi,ij,bj->b", d, torch.linalg.inv(cov), d) / 24)
    torch.testing.assert_close(r.score(q), want, rtol=1e-3, atol=1e-4)


def test_train_gate_fits_the_region_on_the_routed_queries_and_keeps_in_distribution_routing():
    x = torch.cat([blob(40, 8, 5), blob(40, 8, 6, shift=2.0)])
    labels = [0] * 40 + [1] * 40
    off = train_gate(x, labels, GateConfig(epochs=60, ood="off"))
    on = train_gate(x, labels, GateConfig(epochs=60))
    assert off.gate.ood is None and off.info["ood_fit"] == {"method": "off"}
    fit = on.info["ood_fit"]
    assert fit["method"] == "mahalanobis" and fit["reference"] == "routed" and fit["quantile"] == 1.0
    # the training queries the gate routes keep their route
    p_off, r_off, _ = off.decide(x)[:3]
    _, r_on, a_on = on.decide(x)[:3]
    assert (r_on == r_off).float().mean() >= 0.95
    # a query far from every training query is abstained, whatever its probability
    far = blob(10, 8, 7, shift=12.0)
    p_far, r_far, a_far = on.decide(far)[:3]
    assert on.gate.outside(far).all() and not r_far.any()
    assert torch.equal(a_far, p_far >= on.threshold)  # abstained = the rule overrode a "route"
    assert torch.equal(off.decide(far)[1], p_far >= off.threshold)
    # 'routed' with too few routed rows falls back to all rows; 'all' is every row
    assert ood_reference_rows([1, 1, 0, 0, 0, 0, 0, 0, 0, 0], "routed") == list(range(10))
    assert ood_reference_rows([1] * 8 + [0] * 2, "routed") == list(range(8))
    assert ood_reference_rows([1] * 8 + [0] * 2, "all") == list(range(10))
    assert fit_ood(on.gate, x[:3], "knn", 0.9, 5)[0] is None  # too few rows: no region, no error


# ------------------------------------------------------------------------------------------- files


@pytest.mark.parametrize("method", ["mahalanobis", "knn"])
def test_region_saves_and_loads_with_the_gate(tmp_path, method):
    x = torch.cat([blob(30, 8, 8), blob(30, 8, 9, shift=2.0)])
    b = train_gate(x, [0] * 30 + [1] * 30, GateConfig(epochs=30, ood=method))
    b.save(tmp_path)
    cfg = json.loads((tmp_path / "gate_config.json").read_text())
    assert cfg["ood"]["method"] == method and cfg["ood"]["threshold"] == pytest.approx(b.gate.ood.limit)
    loaded = GateBundle.load(tmp_path)
    probe = torch.cat([x, blob(5, 8, 10, shift=9.0)])
    for got, want in zip(loaded.decide(probe), b.decide(probe)):
        assert torch.equal(got, want)
    torch.testing.assert_close(loaded.gate.ood.score(probe), b.gate.ood.score(probe))


def test_old_gate_files_without_an_ood_block_load_unchanged(tiny_model_dir, tmp_path):
    # the tiny artifact is written as artifacts were before issue 29: no ood block, no ood.* tensors
    art = make_tiny_artifact(tiny_model_dir, tmp_path / "built" / "prism")
    assert "ood" not in json.loads((art / "gate_config.json").read_text())
    bundle = Artifact.read(art).gate()
    assert bundle.gate.ood is None
    x = torch.randn(4, bundle.gate.hidden_size)
    p, routed, abstained = bundle.decide(x)[:3]
    assert torch.equal(routed, p >= bundle.threshold) and not abstained.any()


def test_a_broken_ood_block_is_a_one_line_error(tiny_model_dir, tmp_path):
    src = make_tiny_artifact(tiny_model_dir, tmp_path / "built" / "prism")
    for bad in ({"method": "lof", "rows": 1, "threshold": 1.0}, {"method": "knn", "rows": 3, "threshold": "nan"}):
        dst = tmp_path / f"bad-{bad['method']}"
        shutil.copytree(src, dst)
        cfg = json.loads((dst / "gate_config.json").read_text())
        cfg["ood"] = bad
        (dst / "gate_config.json").write_text(json.dumps(cfg))
        with pytest.raises(PrismError, match="re-assemble"):
            Artifact.read(dst).gate()


# ------------------------------------------------------------------------------------------- the gated model


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_gated_model_abstains_in_the_prefill_and_in_route_alike(tiny_model_dir, tmp_path, pooling):
    src = make_tiny_artifact(tiny_model_dir, tmp_path / "built" / "prism")
    art = tmp_path / "prism"
    shutil.copytree(src, art)
    gm0 = GatedModel.from_pretrained(art, device="cpu", dtype="float32")
    feats = query_features(gm0.model, gm0.tokenizer, FAMILIAR, 8, pooling)
    far_feat = query_features(gm0.model, gm0.tokenizer, [FAR], 8, pooling)
    gm0.close()
    gate = Gate(feats.shape[1], [], dropout=0.0, pooling=pooling)
    gate.set_standardisation(feats)
    with torch.no_grad():
        gate.mlp[-1].weight.zero_()
        gate.mlp[-1].bias.fill_(2.0)  # every query is "route" by probability
    region = OODRegion.fit("knn", gate.standardise(feats), k=1)
    inside, outside = (
        float(region.score(gate.standardise(feats)).max()),
        float(region.score(gate.standardise(far_feat))),
    )
    assert outside > inside  # the tiny model's layer-0 feature sees the far query as far
    region.limit = (inside + outside) / 2
    gate.ood = region
    gate.eval()
    GateBundle(gate=gate, threshold=0.5, info={}).save(art)  # replaces the artifact's gate files
    gm = GatedModel.from_pretrained(art, device="cpu", dtype="float32")
    assert gm.has_abstain and gm.gate.pooling == pooling
    queries = [FAMILIAR[0], FAR, FAMILIAR[3]]
    chats = [[{"role": "user", "content": q}] for q in queries]
    want_p = gate(query_features(gm.model, gm.tokenizer, queries, 8, pooling))
    # route() / decisions(): the layer-0-only pass
    dec = gm.decisions(chats)
    assert [d["abstained"] for d in dec] == [False, True, False]
    assert [d["outside"] for d in dec] == [False, True, False]  # every probability says route here
    assert [d["routed"] for d in dec] == [True, False, True]
    assert gm.route(chats) == [(d["gate_prob"], d["routed"]) for d in dec]
    # the prefill hook (forward_logits on a left-padded batch) decides the same
    enc = encode_prompts(gm.tokenizer, [gate_prompt(gm.tokenizer, q) for q in queries])
    _, probs, routed = gm.forward_logits(enc["input_ids"], enc["attention_mask"])
    assert routed.tolist() == [d["routed"] for d in dec] and gm.abstained.tolist() == [False, True, False]
    torch.testing.assert_close(probs, want_p, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor([d["gate_prob"] for d in dec]), want_p, rtol=1e-4, atol=1e-5)
    # generate(): the meta says so, and the abstained row is the base model's answer
    params = SamplingParams(max_new_tokens=6)
    outs = gm.generate(chats, params)
    assert [c.meta for c in outs] == [
        {
            "routed": d["routed"],
            "gate_prob": pytest.approx(d["gate_prob"], abs=1e-5),
            "abstained": d["abstained"],
            "outside": d["outside"],
            "persona": None,  # a binary artifact's unnamed adapter
            "persona_prob": pytest.approx(d["gate_prob"], abs=1e-5) if d["routed"] else None,
        }
        for d in dec
    ]
    base = gm.generate(chats, params, force=False)
    lora = gm.generate(chats, params, force=True)
    assert outs[1].text == base[1].text and outs[0].text == lora[0].text
    assert base[1].meta["abstained"] and not base[1].meta["routed"]
    # a chat that is not a lone user turn is decided by route() from its first user turn: abstains too
    multi = [{"role": "user", "content": FAR}, {"role": "assistant", "content": "?"}, {"role": "user", "content": "ok"}]
    (m,) = gm.generate([multi], SamplingParams(max_new_tokens=2))
    assert m.meta["abstained"] and m.meta["outside"] and not m.meta["routed"]
    assert m.meta["gate_prob"] == pytest.approx(dec[1]["gate_prob"], abs=1e-5)
    gm.close()
