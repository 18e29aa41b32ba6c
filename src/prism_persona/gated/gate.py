"""The routing gate as the artifact stores and inference runs it: :class:`Gate` (standardise + MLP ->
probability) and :class:`GateBundle` (the gate, its threshold and ``gate_config.json``).

The gate returns a probability; the threshold is a separate number stored next to the weights
(chosen at training time by :func:`prism_persona.train.gate.calibrate_threshold`).

Abstain (issue 29): a gate may also hold an :class:`OODRegion`, the region of its standardised feature
space it was trained on (a shrinkage Mahalanobis distance or the k-NN distance to the training
features, with a threshold from cross-fitted in-distribution distances). A query outside it goes to the
base model whatever its probability. :func:`decide` is the one call that gives the final decision
(:class:`Decision`: probability, routed, abstained, persona); every router (the prefill hook,
``GatedModel.route``, lm-eval, the vLLM router) calls it.

K-way gate (issue 29): with K >= 2 personas the gate has K + 1 outputs (base, persona 1 ... K) and a
softmax; the routing probability is that of the most probable persona against base,
``P(k*) / (P(k*) + P(base))`` (:func:`routing_probability`; compared with the threshold as the binary
gate's probability is: at 0.5, route where a persona is more probable than base), the routed persona that
persona k*, and a row whose persona probability is below ``min_confidence`` abstains. K = 1 is the binary gate, unchanged (one output, sigmoid). A
temperature (fitted on held-out rows at training time, 1 when absent) divides the logits of either.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from torch import nn

from ..formats import BINARY_GATE_VERSION, stamp, upgrade
from ..formats import GATE_CONFIG as GATE_CONFIG_FORMAT
from .features import FEATURE_LAYER

GATE_WEIGHTS = "gate.safetensors"
GATE_CONFIG = "gate_config.json"


class Gate(nn.Module):
    """Standardise, then MLP ``hidden -> *hidden_sizes -> 1`` with GELU (``hidden_sizes=[]``: logistic
    regression); :meth:`forward` gives probabilities. ``pooling`` names how the layer-0 states of the
    prompt become the features (:func:`prism_persona.gated.features.pool_states`). The settings come from
    GateConfig when training, from the bundle's gate_config.json when loading (dropout 0).

    ``personas`` = K: 1 is the binary gate (one output); K >= 2 gives K + 1 outputs (class 0 = base,
    class k = persona k - 1). ``temperature`` (a plain attribute, stored in gate_config.json) divides the
    logits; ``min_confidence`` (K >= 2) is the persona probability below which :func:`decide` abstains."""

    def __init__(
        self, hidden_size: int, hidden_sizes: Sequence[int], *, dropout: float, pooling: str, personas: int = 1
    ):
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.pooling = str(pooling)
        self.hidden_sizes = [int(x) for x in hidden_sizes]
        self.personas = max(1, int(personas))
        self.temperature = 1.0
        self.min_confidence = 0.0
        layers: list[nn.Module] = []
        width = self.hidden_size
        for h in self.hidden_sizes:
            layers += [nn.Linear(width, h), nn.GELU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, 1 if self.personas == 1 else self.personas + 1))
        self.mlp = nn.Sequential(*layers)
        self.register_buffer("mean", torch.zeros(self.hidden_size))
        self.register_buffer("std", torch.ones(self.hidden_size))
        # the abstain region (None: every query is in-distribution, as before issue 29)
        self.ood: Optional[OODRegion] = None
        # the everyday region the abstain rule contrasts with (gate.ood_contrast; None: off)
        self.ood_contrast: Optional[OODRegion] = None

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        return (features.to(self.mean.dtype) - self.mean) / self.std

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The MLP's raw output (before the temperature): ``[batch]`` for K = 1, ``[batch, K + 1]`` else."""
        out = self.mlp(self.standardise(features))
        return out.squeeze(-1) if self.personas == 1 else out

    def class_logits(self, features: torch.Tensor, temperature: Optional[float] = None) -> torch.Tensor:
        """``[batch, K + 1]`` logits over (base, persona 1 ... K) divided by the temperature (K = 1: the
        binary logit ``z`` as ``[0, z]``, whose softmax is ``[1 - sigmoid(z), sigmoid(z)]``)."""
        z = self.logits(features)
        if self.personas == 1:
            z = torch.stack([torch.zeros_like(z), z], dim=-1)
        return z / float(self.temperature if temperature is None else temperature)

    def class_probs(self, features: torch.Tensor) -> torch.Tensor:
        """Calibrated probability of each class (base, persona 1 ... K) per row, ``[batch, K + 1]``."""
        return torch.softmax(self.class_logits(features), dim=-1)

    def outside(self, features: torch.Tensor) -> torch.Tensor:
        """Bool per row: the query lies outside the region the gate was trained on (all False when the
        gate has no :class:`OODRegion`)."""
        if self.ood is None:
            return torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)
        z = self.standardise(features)
        if self.ood_contrast is None:
            return self.ood.outside(z)
        # gate.ood_contrast: also outside where the query is more typical of everyday requests, relative
        # to the queries the persona won, than those were (distance to the wins / to the everyday queries)
        wins = self.ood.score(z)
        ratio = wins / self.ood_contrast.score(z).clamp_min(1e-12)
        return (wins > self.ood.limit) | (ratio > self.ood_contrast.limit)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Routing probability per row, ``[batch]``: the probability that a persona answers better than
        the base model (K = 1: sigmoid of the logit; K >= 2: :func:`routing_probability`)."""
        if self.personas == 1:
            z = self.logits(features)
            return torch.sigmoid(z if self.temperature == 1.0 else z / self.temperature)
        return routing_probability(self.class_logits(features))

    def set_standardisation(self, features: torch.Tensor) -> None:
        if features.shape[0] == 0:
            return
        self.mean.copy_(features.mean(0))
        std = features.std(0, unbiased=False) if features.shape[0] > 1 else torch.ones_like(self.std)
        self.std.copy_(std.clamp_min(1e-6))


OOD_METHODS = ("off", "mahalanobis", "knn")


class OODRegion(nn.Module):
    """The in-distribution region of a gate, in its standardised feature space ``z``.

    ``mahalanobis``: ``sqrt((z - center)^T Sigma^-1 (z - center) / dim)`` with Sigma the Ledoit-Wolf
    shrinkage of the reference rows' covariance towards ``nu * I``; stored as the covariance's
    eigenvectors (``basis`` [rank, dim]) and eigenvalues, so the file grows with the number of training
    rows, not with dim^2. ``knn``: the mean Euclidean distance to the ``k`` nearest reference rows
    (``reference`` [n, dim]) divided by sqrt(dim). A row whose score exceeds ``limit`` (gate_config.json:
    ``ood.threshold``) is outside.
    """

    def __init__(self, method: str, dim: int, rows: int, *, k: int, limit: float = math.inf, **stats: float):
        super().__init__()
        if method not in OOD_METHODS[1:]:
            raise ValueError(f"unknown gate ood method {method!r}; use one of {', '.join(OOD_METHODS)}")
        self.method, self.dim, self.rows, self.k = method, int(dim), int(rows), max(1, int(k))
        self.limit = float(limit)
        self.alpha = float(stats.get("alpha", 0.0))
        self.nu = float(stats.get("nu", 1.0))
        self.register_buffer("center", torch.zeros(self.dim))
        if method == "mahalanobis":
            self.register_buffer("basis", torch.zeros(self.rows, self.dim))
            self.register_buffer("eigvals", torch.zeros(self.rows))
        else:
            self.register_buffer("reference", torch.zeros(self.rows, self.dim))

    # ---------------------------------------------------------------------------------------- fit

    @classmethod
    def fit(cls, method: str, z: torch.Tensor, k: int) -> OODRegion:
        """The region of the reference rows ``z`` [n, dim] (standardised features); limit inf (set it after)."""
        z = z.detach().float().cpu()
        n, dim = z.shape
        if method == "knn":
            region = cls("knn", dim, n, k=k)
            region.reference.copy_(z)
            return region
        center = z.mean(0)
        x = z - center
        # Ledoit-Wolf shrinkage intensity, computed from the n x n Gram matrix (dim may be >> n)
        gram = x @ x.T
        tr_s = float(torch.diagonal(gram).sum()) / n
        nu = max(tr_s / dim, 1e-12)
        s_fro2 = float((gram**2).sum()) / n**2
        norms2 = torch.diagonal(gram)
        xsx = (gram**2).sum(1) / n  # x_k^T S x_k
        beta2 = float((norms2**2 - 2 * xsx + s_fro2).sum()) / n**2
        delta2 = s_fro2 - 2 * nu * tr_s + nu**2 * dim
        alpha = 1.0 if delta2 <= 0 else min(1.0, max(beta2 / delta2, 1e-3))
        _, sv, vh = torch.linalg.svd(x, full_matrices=False)
        lam = sv**2 / n
        keep = lam > lam.max().clamp_min(1e-12) * 1e-6 if lam.numel() else lam > 0
        region = cls("mahalanobis", dim, int(keep.sum()), k=k, alpha=alpha, nu=nu)
        region.center.copy_(center)
        region.basis.copy_(vh[keep])
        region.eigvals.copy_(lam[keep])
        return region

    # ---------------------------------------------------------------------------------------- score

    def score(self, z: torch.Tensor) -> torch.Tensor:
        """Distance of each row of ``z`` [b, dim] from the region (per feature dimension, so the scale
        does not grow with the model's width)."""
        z = z.to(self.center.dtype)
        if self.method == "knn":
            ref = self.reference
            if ref.shape[0] == 0:
                return torch.full((z.shape[0],), math.inf, device=z.device)
            d = torch.cdist(z, ref)
            k = min(self.k, ref.shape[0])
            return d.topk(k, dim=1, largest=False).values.mean(1) / math.sqrt(self.dim)
        x = z - self.center
        proj = x @ self.basis.T
        floor = self.alpha * self.nu
        inside = (proj**2 / ((1 - self.alpha) * self.eigvals + floor)).sum(1)
        resid = ((x**2).sum(1) - (proj**2).sum(1)).clamp_min(0) / max(floor, 1e-12)
        return torch.sqrt((inside + resid) / self.dim)

    def outside(self, z: torch.Tensor) -> torch.Tensor:
        return self.score(z) > self.limit

    def settings(self) -> dict:
        """The region's description for ``gate_config.json`` (its tensors go to gate.safetensors)."""
        return {
            "method": self.method,
            "rows": self.rows,
            "k": self.k,
            "threshold": self.limit,
            "alpha": self.alpha,
            "nu": self.nu,
        }


def region_from_settings(ood: dict, dim: int) -> OODRegion:
    """An empty :class:`OODRegion` shaped as ``gate_config.json`` describes it (its tensors load after)."""
    limit = float(ood["threshold"])
    if not math.isfinite(limit):
        raise ValueError(f"ood.threshold must be a finite number, got {ood['threshold']!r}")
    return OODRegion(
        str(ood["method"]),
        dim,
        int(ood["rows"]),
        k=int(ood.get("k", 5)),
        limit=limit,
        alpha=float(ood.get("alpha", 0.0)),
        nu=float(ood.get("nu", 1.0)),
    )


class Decision(NamedTuple):
    """The gate's decision on a batch of rows (:func:`decide`)."""

    probs: torch.Tensor
    """``[b]`` the routing probability (K = 1: the binary gate's; K >= 2: :func:`routing_probability`)."""
    routed: torch.Tensor
    """``[b]`` bool: the row runs with an adapter."""
    abstained: torch.Tensor
    """``[b]`` bool: the probability says route, but the row goes to the base model (outside the
    gate's region, or, K >= 2, persona probability below ``min_confidence``)."""
    persona: torch.Tensor
    """``[b]`` long: index into the gate's persona list where routed (K = 1: 0), -1 = base."""
    class_probs: torch.Tensor
    """``[b, K + 1]`` calibrated probabilities of (base, persona 1 ... K)."""
    outside: torch.Tensor
    """``[b]`` bool: the row's feature lies outside the gate's region (or, K >= 2, no persona reaches
    ``min_confidence``), whether or not the probability said route: such a row goes to the base model at
    every threshold (``abstained`` = route wanted and ``outside``). All False for a gate that cannot abstain."""


def routing_probability(class_logits: torch.Tensor) -> torch.Tensor:
    """``[b]`` routing probability of a K-way gate from its ``[b, K + 1]`` class logits: the probability
    of the most probable persona k* against base, ``P(k*) / (P(k*) + P(base)) = sigmoid(l_k* - l_base)``
    (K = 1: the binary gate's sigmoid). A routed row runs k*'s adapter only, so the other personas'
    probability is no reason to route it (``1 - P(base)`` counted it). At threshold 0.5 the rule is
    "a persona is more probable than base", which a temperature does not change; ``1 - P(base)`` rose
    towards K / (K + 1) as the fitted temperature softened the probabilities (docs/kits.md)."""
    return torch.sigmoid(class_logits[:, 1:].max(-1).values - class_logits[:, 0])


def persona_choice(class_probs: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
    """The routed persona per row: the most probable persona where ``routed``, -1 elsewhere (for a
    caller that overrides ``routed`` after :func:`decide`, e.g. a forced route)."""
    best = class_probs[:, 1:].argmax(-1)
    return torch.where(routed.to(best.device), best, torch.full_like(best, -1))


def decide(gate: Gate, threshold: float, features: torch.Tensor, min_confidence: Optional[float] = None) -> Decision:
    """The gate's final decision on layer-0 ``features`` [b, hidden] (:class:`Decision`).

    ``probs``: the gate's probability; the probability says route where ``probs >= threshold``.
    ``abstained``: it says route but the query lies outside the region the gate was trained on
    (:class:`OODRegion`) or, K >= 2, the most probable persona's probability is below ``min_confidence``
    (default: the gate's own, from gate_config.json); such a row goes to the base model. ``routed``:
    route and not abstained; ``persona``: the most probable persona where routed, -1 elsewhere. Every
    router calls this (one rule for the prefill hook, route(), lm-eval, vLLM)."""
    feats = features.to(device=gate.mean.device, dtype=gate.mean.dtype)
    logits = gate.class_logits(feats)  # one pass of the MLP
    class_probs = torch.softmax(logits, dim=-1)
    # K = 1: sigmoid of the logit, exactly as gate(feats); K >= 2: the best persona against base
    probs = torch.sigmoid(logits[:, 1]) if gate.personas == 1 else routing_probability(logits)
    wanted = probs >= threshold
    outside = gate.outside(feats)
    if gate.personas > 1:
        floor = gate.min_confidence if min_confidence is None else float(min_confidence)
        outside = outside | (class_probs[:, 1:].max(-1).values < floor)
    abstained = wanted & outside
    routed = wanted & ~abstained
    return Decision(probs, routed, abstained, persona_choice(class_probs, routed), class_probs, outside)


@dataclass
class GateBundle:
    """A trained gate, its routing threshold and what it was trained on (``gate_config.json``)."""

    gate: Gate
    threshold: float = 0.5
    info: dict = field(default_factory=dict)

    def route(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities, routed bools) for ``features``; routed includes the abstain rule."""
        d = self.decide(features)
        return d.probs, d.routed

    def decide(self, features: torch.Tensor) -> Decision:
        """:func:`decide` with this bundle's threshold."""
        return decide(self.gate, self.threshold, features)

    @property
    def personas(self) -> list[str]:
        """The names of the gate's personas (index = :attr:`Decision.persona`); K = 1: one entry."""
        listed = self.info.get("personas")
        if isinstance(listed, list) and len(listed) == self.gate.personas:
            return [str(p.get("name", i) if isinstance(p, dict) else p) for i, p in enumerate(listed)]
        return ["persona"] * self.gate.personas

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
        if self.gate.ood is not None:
            cfg["ood"] = self.gate.ood.settings()
            if self.gate.ood_contrast is not None:
                cfg["ood"]["contrast"] = self.gate.ood_contrast.settings()
        else:
            cfg.pop("ood", None)
        cfg["temperature"] = float(self.gate.temperature)
        if self.gate.personas > 1:
            personas = cfg.get("personas")
            if not isinstance(personas, list) or len(personas) != self.gate.personas:
                raise ValueError(f"a {self.gate.personas}-persona gate needs info['personas'] with as many entries")
            cfg["min_confidence"] = float(self.gate.min_confidence)
        else:
            cfg.pop("personas", None)
            cfg.pop("min_confidence", None)
        # the binary gate keeps version 1 (older PRISM reads it); personas need version 2
        cfg = stamp(cfg, GATE_CONFIG_FORMAT, version=BINARY_GATE_VERSION if self.gate.personas == 1 else None)
        (d / GATE_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path) -> GateBundle:
        from safetensors.torch import load_file

        d = Path(directory)
        cfg = json.loads((d / GATE_CONFIG).read_text(encoding="utf-8"))
        # a file without format_version is version 1; a newer one is a one-line PrismError
        cfg = upgrade(cfg, GATE_CONFIG_FORMAT, str(d / GATE_CONFIG))
        # artifacts written before the pooling was stored used the last prompt token (and a [128, 64] MLP)
        personas = cfg.get("personas")  # K >= 2 only (format_version 2)
        if personas is not None and (not isinstance(personas, list) or len(personas) < 2):
            raise ValueError(f"personas must be a list of at least 2 personas, got {personas!r}")
        gate = Gate(
            cfg["hidden_size"],
            cfg.get("hidden_sizes", [128, 64]),
            dropout=0.0,
            pooling=cfg.get("pooling", "last"),
            personas=len(personas) if personas else 1,
        )
        temperature = float(cfg.get("temperature", 1.0))  # absent before calibration existed: none
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive finite number, got {cfg.get('temperature')!r}")
        gate.temperature = temperature
        if personas:
            floor = float(cfg.get("min_confidence", 0.0))
            if not (0.0 <= floor <= 1.0):
                raise ValueError(f"min_confidence must be in [0, 1], got {cfg.get('min_confidence')!r}")
            gate.min_confidence = floor
        ood = cfg.get("ood")  # absent in artifacts written before issue 29: no abstain region
        if isinstance(ood, dict) and ood.get("method", "off") != "off":
            gate.ood = region_from_settings(ood, gate.hidden_size)
            contrast = ood.get("contrast")  # absent before gate.ood_contrast: the rule is unchanged
            if isinstance(contrast, dict):
                gate.ood_contrast = region_from_settings(contrast, gate.hidden_size)
        gate.load_state_dict(load_file(str(d / GATE_WEIGHTS)))
        gate.eval()
        return cls(gate=gate, threshold=float(cfg.get("threshold", 0.5)), info=cfg)
