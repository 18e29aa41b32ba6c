"""Gated LoRA layers: one LoRA per persona, each applied only to the rows a :class:`RoutingState` gives it.

:func:`install_adapters` loads standard PEFT LoRA adapter directories (one per persona, in order) into
:class:`GatedLoRALinear` modules in place of the targeted ``nn.Linear`` layers (decoder layers 1..L-1);
:func:`install_adapter` is the one-adapter case. Each row gets at most one adapter (``RoutingState.persona``:
-1 = base model, k = adapter k):

* no row routed: the module returns ``base(x)`` untouched (base-model speed, base-model logits);
* all rows on one adapter: that adapter's delta is added to the whole batch (same maths as PEFT's LoRA);
* otherwise, for each adapter that has rows: its rows are gathered (``index_select``), get its delta,
  and it is scattered back with ``index_add``; a row never pays for an adapter other than its own,
  an unrouted row for none.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_ADAPTER = "default"  # PEFT's name for the adapter at the root of a saved directory
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
"""An adapter (persona) name: a folder name in the artifact and a PEFT adapter name (no dots, no slashes)."""


class RoutingState:
    """Per-row routing shared by every gated LoRA module of one model: which adapter each row gets.

    ``adapters`` (the installed adapters' names, in order) is set by :func:`install_adapters`.
    """

    def __init__(self) -> None:
        self.adapters: list[str] = []
        self.clear()

    def clear(self) -> None:
        self.routed: Optional[torch.Tensor] = None  # bool [batch]
        self.persona: Optional[torch.Tensor] = None  # long [batch]: -1 = base model, k = adapter k
        self.index: Optional[torch.Tensor] = None  # long [n_routed]
        # per adapter with rows: (k, its rows, or None when it has every row of the batch)
        self.groups: list[tuple[int, Optional[torch.Tensor]]] = []
        self.any_on = False
        self.all_on = False
        self.probs: Optional[torch.Tensor] = None
        self.features: Optional[torch.Tensor] = None  # the gate's inputs of the last decision

    def set(
        self,
        routed: torch.Tensor,
        probs: Optional[torch.Tensor] = None,
        features: Optional[torch.Tensor] = None,
        persona: Optional[torch.Tensor] = None,
    ) -> None:
        """Route row i to adapter ``persona[i]`` where ``routed[i]`` (``persona`` None: adapter 0, one
        adapter's behaviour); a row with ``persona[i] == -1`` gets the base model even when routed."""
        routed = routed.bool()
        if persona is None:
            chosen = torch.where(routed, 0, -1).long()
        else:
            persona = persona.to(device=routed.device, dtype=torch.long)
            if persona.shape != routed.shape:
                raise ValueError(f"persona has shape {list(persona.shape)}, routed {list(routed.shape)}")
            chosen = torch.where(routed, persona, torch.full_like(persona, -1))
        self.persona = chosen
        self.routed = chosen >= 0
        self.index = torch.nonzero(self.routed, as_tuple=False).flatten()
        n, rows = int(self.index.numel()), int(self.routed.numel())
        self.any_on = n > 0
        self.all_on = n == rows
        self.groups = []
        if self.any_on:
            ks = torch.unique(chosen[self.index]).tolist()
            if self.adapters and ks[-1] >= len(self.adapters):
                raise ValueError(f"persona index {ks[-1]} for {len(self.adapters)} adapter(s)")
            for k in ks:
                idx = self.index if len(ks) == 1 else torch.nonzero(chosen == k, as_tuple=False).flatten()
                self.groups.append((int(k), None if int(idx.numel()) == rows else idx))
        self.probs = probs
        self.features = features


class GatedLoRALinear(nn.Module):
    """``base(x) + scaling_k * B_k(A_k(x))`` on the rows of adapter k only; exactly ``base(x)`` when no
    row is routed. ``lora_A`` / ``lora_B`` / ``scaling`` are keyed by adapter name (as in PEFT); an
    adapter that does not target this layer leaves its rows at ``base(x)`` here."""

    def __init__(self, base: nn.Linear, state: RoutingState):
        super().__init__()
        self.base = base
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.state = state

    def add_adapter(self, name: str, r: int, scaling: float) -> None:
        w = self.base.weight
        self.lora_A[name] = nn.Linear(self.base.in_features, r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B[name] = nn.Linear(r, self.base.out_features, bias=False, device=w.device, dtype=w.dtype)
        nn.init.zeros_(self.lora_B[name].weight)
        self.scaling[name] = float(scaling)

    def delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a = self.lora_A[name]
        return self.lora_B[name](a(x.to(a.weight.dtype))) * self.scaling[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        """``scaling * B @ A`` of adapter ``name`` (float32): what merging it into ``base`` adds."""
        return (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()) * self.scaling[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        st = self.state
        if not st.any_on:
            return out
        if st.routed.numel() != x.shape[0]:
            raise RuntimeError(f"routing flags for {st.routed.numel()} rows, batch has {x.shape[0]}")
        owned = False  # base(x) is left untouched; the first delta makes the copy the others add into
        for k, idx in st.groups:
            name = st.adapters[k] if st.adapters else DEFAULT_ADAPTER  # a state no install has named
            if name not in self.lora_A:
                continue
            if idx is None:
                out = out + self.delta(x, name).to(out.dtype)
            elif owned:
                out.index_add_(0, idx, self.delta(x.index_select(0, idx), name).to(out.dtype))
            else:
                out = out.index_add(0, idx, self.delta(x.index_select(0, idx), name).to(out.dtype))
            owned = True
        return out


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


def _read_adapter(d: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(adapter_config.json, ``module name -> {"A", "B"}``) of a PEFT LoRA adapter directory."""
    from safetensors.torch import load_file

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
    return cfg, pairs


def install_adapters(model, adapters: Sequence[tuple[str, str | Path]], state: RoutingState) -> list[str]:
    """Load PEFT LoRA adapter dirs ``[(name, dir), ...]`` (adapter k = persona k) into gated LoRA
    modules of ``model``; ``state.adapters`` becomes their names. Returns the gated module names."""
    names = [str(n) for n, _ in adapters]
    if not names:
        raise ValueError("no adapter to install")
    if len(set(names)) != len(names) or not all(ADAPTER_NAME.match(n) for n in names):
        raise ValueError(f"adapter names must be distinct folder names (letters, digits, _ and -), got {names}")
    modules = dict(model.named_modules())
    gated: dict[str, GatedLoRALinear] = {}
    for adapter_name, adapter_dir in adapters:
        cfg, pairs = _read_adapter(Path(adapter_dir))
        r_default, alpha_default = int(cfg["r"]), float(cfg["lora_alpha"])
        rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        for name, ab in sorted(pairs.items()):
            gl = gated.get(name)
            if gl is None:
                if name not in modules or not isinstance(modules[name], nn.Linear):
                    raise ValueError(f"adapter targets '{name}', which is not a Linear layer of this model")
                gl = gated[name] = GatedLoRALinear(modules[name], state)
            r = int(ab["A"].shape[0])
            alpha = float(next((v for k, v in alpha_pattern.items() if name.endswith(k)), alpha_default))
            if r != r_default and not any(name.endswith(k) for k in rank_pattern):
                log.warning("adapter %s: %s has rank %d, config says %d", adapter_name, name, r, r_default)
            gl.add_adapter(str(adapter_name), r, alpha / (r**0.5) if cfg.get("use_rslora") else alpha / r)
            with torch.no_grad():
                gl.lora_A[str(adapter_name)].weight.copy_(ab["A"])
                gl.lora_B[str(adapter_name)].weight.copy_(ab["B"])
    for name, gl in gated.items():
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, gl)
    state.adapters = names
    return sorted(gated)


def install_adapter(model, adapter_dir: str | Path, state: RoutingState) -> list[str]:
    """Load one PEFT LoRA adapter dir (PEFT's ``default``) into gated LoRA modules of ``model``."""
    return install_adapters(model, [(DEFAULT_ADAPTER, adapter_dir)], state)
