"""Gated LoRA layers: a LoRA delta applied only to the rows a :class:`RoutingState` marks as routed.

:func:`install_adapter` loads a standard PEFT LoRA adapter directory into :class:`GatedLoRALinear`
modules in place of the targeted ``nn.Linear`` layers (decoder layers 1..L-1).

* all rows off: the module returns ``base(x)`` untouched (base-model speed, base-model logits);
* all rows on: the delta is added to the whole batch (same maths as PEFT's LoRA);
* mixed: the routed rows are gathered (``index_select``), get their delta, and it is scattered back
  with ``index_add``; unrouted rows never pay for the LoRA matmuls.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
from torch import nn

log = logging.getLogger(__name__)


class RoutingState:
    """Per-row routing flags shared by every gated LoRA module of one model."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.routed: Optional[torch.Tensor] = None  # bool [batch]
        self.index: Optional[torch.Tensor] = None  # long [n_routed]
        self.any_on = False
        self.all_on = False
        self.probs: Optional[torch.Tensor] = None
        self.features: Optional[torch.Tensor] = None  # the gate's inputs of the last decision

    def set(
        self, routed: torch.Tensor, probs: Optional[torch.Tensor] = None, features: Optional[torch.Tensor] = None
    ) -> None:
        self.routed = routed.bool()
        self.index = torch.nonzero(self.routed, as_tuple=False).flatten()
        n = int(self.index.numel())
        self.any_on = n > 0
        self.all_on = n == int(self.routed.numel())
        self.probs = probs
        self.features = features


class GatedLoRALinear(nn.Module):
    """``base(x) + scaling * B(A(x))`` on the routed rows only; exactly ``base(x)`` when none is routed."""

    def __init__(self, base: nn.Linear, r: int, scaling: float, state: RoutingState):
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = float(scaling)
        self.state = state

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        st = self.state
        if not st.any_on:
            return out
        if st.routed.numel() != x.shape[0]:
            raise RuntimeError(f"routing flags for {st.routed.numel()} rows, batch has {x.shape[0]}")
        if st.all_on:
            return out + self.delta(x).to(out.dtype)
        idx = st.index
        return out.index_add(0, idx, self.delta(x.index_select(0, idx)).to(out.dtype))


def _adapter_module_name(key: str) -> tuple[str, str]:
    """``base_model.model.model.layers.3.mlp.up_proj.lora_A.weight`` -> (``model.layers.3.mlp.up_proj``, ``A``)."""
    name = key
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    for part in ("A", "B"):
        for suffix in (f".lora_{part}.weight", f".lora_{part}.default.weight"):
            if name.endswith(suffix):
                return name[: -len(suffix)], part
    raise ValueError(f"not a LoRA A/B weight: {key}")


def install_adapter(model, adapter_dir: str | Path, state: RoutingState) -> list[str]:
    """Load a PEFT LoRA adapter dir into gated LoRA modules of ``model``; returns the module names."""
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    cfg = json.loads((d / "adapter_config.json").read_text(encoding="utf-8"))
    if cfg.get("use_dora"):
        raise ValueError("DoRA adapters are not supported by the gated model")
    weights_file = d / "adapter_model.safetensors"
    if weights_file.exists():
        weights = load_file(str(weights_file))
    else:
        weights = torch.load(d / "adapter_model.bin", map_location="cpu", weights_only=True)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in weights.items():
        if ".lora_" not in key:
            continue
        name, part = _adapter_module_name(key)
        pairs.setdefault(name, {})[part] = value
    r_default, alpha_default = int(cfg["r"]), float(cfg["lora_alpha"])
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    modules = dict(model.named_modules())
    installed = []
    for name, ab in sorted(pairs.items()):
        if name not in modules or not isinstance(modules[name], nn.Linear):
            raise ValueError(f"adapter targets '{name}', which is not a Linear layer of this model")
        r = int(ab["A"].shape[0])
        alpha = float(next((v for k, v in alpha_pattern.items() if name.endswith(k)), alpha_default))
        if r != r_default and not any(name.endswith(k) for k in rank_pattern):
            log.warning("adapter: %s has rank %d, config says %d", name, r, r_default)
        scaling = alpha / (r**0.5) if cfg.get("use_rslora") else alpha / r
        base = modules[name]
        gl = GatedLoRALinear(base, r, scaling, state)
        with torch.no_grad():
            gl.lora_A.weight.copy_(ab["A"])
            gl.lora_B.weight.copy_(ab["B"])
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, gl)
        installed.append(name)
    return installed
