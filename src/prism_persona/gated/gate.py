"""The routing gate as the artifact stores and inference runs it: :class:`Gate` (standardise + MLP ->
probability) and :class:`GateBundle` (the gate, its threshold and ``gate_config.json``).

The gate returns a probability; the threshold is a separate number stored next to the weights
(chosen at training time by :func:`prism_persona.train.gate.calibrate_threshold`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .features import FEATURE_LAYER

GATE_WEIGHTS = "gate.safetensors"
GATE_CONFIG = "gate_config.json"


class Gate(nn.Module):
    """Standardise, then MLP ``hidden -> *hidden_sizes -> 1`` with GELU (``hidden_sizes=[]``: logistic
    regression); :meth:`forward` gives probabilities. ``pooling`` names how the layer-0 states of the
    prompt become the features (:func:`prism_persona.gated.features.pool_states`). The settings come from
    GateConfig when training, from the bundle's gate_config.json when loading (dropout 0)."""

    def __init__(self, hidden_size: int, hidden_sizes: Sequence[int], *, dropout: float, pooling: str):
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.pooling = str(pooling)
        self.hidden_sizes = [int(x) for x in hidden_sizes]
        layers: list[nn.Module] = []
        width = self.hidden_size
        for h in self.hidden_sizes:
            layers += [nn.Linear(width, h), nn.GELU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)
        self.register_buffer("mean", torch.zeros(self.hidden_size))
        self.register_buffer("std", torch.ones(self.hidden_size))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        x = (features.to(self.mean.dtype) - self.mean) / self.std
        return self.mlp(x).squeeze(-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Routing probability per row, ``[batch]``."""
        return torch.sigmoid(self.logits(features))

    def set_standardisation(self, features: torch.Tensor) -> None:
        if features.shape[0] == 0:
            return
        self.mean.copy_(features.mean(0))
        std = features.std(0, unbiased=False) if features.shape[0] > 1 else torch.ones_like(self.std)
        self.std.copy_(std.clamp_min(1e-6))


@dataclass
class GateBundle:
    """A trained gate, its routing threshold and what it was trained on (``gate_config.json``)."""

    gate: Gate
    threshold: float = 0.5
    info: dict = field(default_factory=dict)

    def route(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities, routed bools) for ``features``."""
        p = self.gate(features)
        return p, p >= self.threshold

    def save(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        from .. import __version__

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.gate.state_dict().items()}
        save_file(state, str(d / GATE_WEIGHTS))
        cfg = dict(self.info)
        feature = "mean over the prompt's tokens" if self.gate.pooling == "mean" else "last prompt token"
        cfg.update(
            feature_layer=FEATURE_LAYER,
            feature=f"{feature} after decoder layer 0",
            pooling=self.gate.pooling,
            hidden_size=self.gate.hidden_size,
            hidden_sizes=self.gate.hidden_sizes,
            threshold=float(self.threshold),
            prism_version=__version__,
        )
        (d / GATE_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path) -> GateBundle:
        from safetensors.torch import load_file

        d = Path(directory)
        cfg = json.loads((d / GATE_CONFIG).read_text(encoding="utf-8"))
        # artifacts written before the pooling was stored used the last prompt token (and a [128, 64] MLP)
        gate = Gate(
            cfg["hidden_size"], cfg.get("hidden_sizes", [128, 64]), dropout=0.0, pooling=cfg.get("pooling", "last")
        )
        gate.load_state_dict(load_file(str(d / GATE_WEIGHTS)))
        gate.eval()
        return cls(gate=gate, threshold=float(cfg.get("threshold", 0.5)), info=cfg)
