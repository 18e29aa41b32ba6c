"""One query, one routing decision: every path that runs a gated model reads the same gate feature.

The paths: ``GatedModel.route`` (``prism serve``'s backend, ``prism check``'s routing report), the
prefill hook inside ``GatedModel.generate`` (``prism generate``/``chat``/``check``), the layer-0-only
router in front of vLLM (``gated.router.load_router``) and ``prism-lm-eval`` (``PrismLM.route`` on the
chat-templated context). Run for every pooling the gate supports: a path that pooled differently from
the artifact's gate (lm-eval read the last token of a mean-pooled gate) gives other probabilities.
"""

from __future__ import annotations

import pytest

from prism_persona.engines.base import SamplingParams
from prism_persona.gated.features import POOLINGS
from prism_persona.models import render_chat, user_chat
from prism_persona.testing import SPLIT_QUERIES, make_tiny_artifact

QUERIES = list(SPLIT_QUERIES) + ["a much longer request about the history of the printing press in Europe"]


def test_the_tiny_artifact_has_the_product_default_gate(tiny_model_dir, tmp_path):
    """The artifact the tests run on is built from the default GateConfig (shape and pooling)."""
    from prism_persona.config import GateConfig
    from prism_persona.gated.artifact import Artifact

    gate = Artifact.read(make_tiny_artifact(tiny_model_dir, tmp_path / "prism")).gate().gate
    assert gate.pooling == GateConfig().pooling
    assert gate.hidden_sizes == list(GateConfig().hidden_sizes)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_every_routing_path_gives_the_same_probability(tiny_model_dir, tmp_path, pooling):
    from prism_persona.evals.lmeval import PrismLM
    from prism_persona.gated.model import GatedModel
    from prism_persona.gated.router import load_router
    from prism_persona.serve.backend import GatedBackend

    art = make_tiny_artifact(tiny_model_dir, tmp_path / f"prism-{pooling}", pooling=pooling, ood=True)
    chats = [user_chat(q) for q in QUERIES]
    gm = GatedModel.from_pretrained(art, device="cpu", dtype="float32")
    assert gm.gate.pooling == pooling

    assert gm.gate.ood is not None  # the abstain rule is part of the decision every path must share
    decided = gm.decisions(chats)
    assert decided[-1]["abstained"] and not decided[-1]["routed"]  # the long query lies outside the 4 queries' region
    via_route = [p for p, _ in gm.route(chats)]
    routed = [r for _, r in gm.route(chats)]
    via_serve = [p for p, _ in GatedBackend(gm).route(chats)]
    completions = gm.generate(chats, SamplingParams(max_new_tokens=1))
    via_prefill = [c.meta["gate_prob"] for c in completions]
    router_routes = load_router(str(art), device="cpu", dtype="float32").route(chats)
    via_router = [p for p, _ in router_routes]
    lm = PrismLM(artifact=str(art), system="prism", device="cpu", dtype="float32", batch_size=2)
    contexts = [lm.tok_encode(render_chat(lm.tokenizer, c)) for c in chats]
    via_lmeval, routed_lmeval = lm.route(contexts)

    for name, probs in [
        ("serve", via_serve),
        ("prefill", via_prefill),
        ("vllm router", via_router),
        ("lm-eval", via_lmeval),
    ]:
        assert probs == pytest.approx(via_route, abs=1e-5), name
    # one decision too, abstain rule included
    assert routed_lmeval == routed
    assert [c.meta["routed"] for c in completions] == routed
    assert [r for _, r in router_routes] == routed
    assert [c.meta["abstained"] for c in completions] == [d["abstained"] for d in decided]
    # the test has teeth: reading the other pooling's feature (lm-eval's old bug) gives other probabilities
    import torch

    from prism_persona.gated.features import query_features

    other = "last" if pooling == "mean" else "mean"
    with torch.no_grad():
        wrong = gm.gate(query_features(gm.model, gm.tokenizer, QUERIES, 8, other)).tolist()
    assert wrong != pytest.approx(via_route, abs=1e-3)
