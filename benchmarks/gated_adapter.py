"""Glue between the benchmarks and ``prism_persona.gated.model``: a GatedModel from a random PEFT LoRA + gate.

The benchmarks build the LoRA with PEFT first (to time PEFT's own paths), save it as the PEFT adapter
dir the gated model loads, unload PEFT (back to the bare base model), then wrap the same weights with
``GatedModel.from_parts``: no second copy of the base weights, no download.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import common


def random_gate_bundle(hidden: int, seed: int = 0, threshold: float = 0.5):
    """PRISM's gate module (standardise + MLP hidden->128->64->1) with random weights."""
    import torch

    from prism_persona.gated.gate import Gate, GateBundle

    torch.manual_seed(seed)
    gate = Gate(hidden, list(common.GATE_HIDDEN), dropout=0.0, pooling="last")
    gate.eval()
    return GateBundle(gate=gate, threshold=threshold, info={"note": "random gate for benchmarks"})


def gated_from_peft(pm, built: common.Built, seed: int = 0):
    """Save ``pm``'s adapter, unload PEFT, wrap the bare model as a GatedModel. Returns ``(gm, tmpdir)``."""
    from prism_persona.gated.model import GatedModel

    tmp = tempfile.TemporaryDirectory(prefix="prism-bench-adapter-")
    adapter = Path(tmp.name) / "adapter"
    pm.save_pretrained(str(adapter))
    bare = pm.unload()  # removes the LoRA layers, keeps the (unmerged) base weights
    bare.eval()
    gm = GatedModel.from_parts(bare, built.tokenizer, random_gate_bundle(built.hidden, seed), str(adapter))
    built.model = bare
    return gm, tmp


def runner(gm):
    """``(ids, mask, routes, settings, fast) -> new tokens``: routes forced per row (half/half)."""
    import fastgen

    def run(ids, mask, routes, settings, fast: bool):
        new, _, _ = fastgen.generate_gated(gm, ids, mask, settings, force=list(routes), fast=fast)
        return new

    return run


def merge_and_strip(gm) -> object:
    """Fold every gated LoRA delta into its base weight and put the plain Linear back (always-on LoRA,
    merged; the first adapter); removes the gate hook. Returns the plain model."""
    import torch

    from prism_persona.gated.layers import GatedLoRALinear

    model = gm.model
    gm.close()
    swaps = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, GatedLoRALinear)]
    with torch.no_grad():
        for name, mod in swaps:
            delta = mod.delta_weight(gm.state.adapters[0])
            mod.base.weight.add_(delta.to(mod.base.weight.dtype))
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, mod.base)
    return model
