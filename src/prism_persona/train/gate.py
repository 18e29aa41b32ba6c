"""Stage 5: train the routing gate on the layer-0 features of the labelled queries.

The features come from :mod:`prism_persona.gated.features` (the same code the gated model runs inside
its prefill); the gate module and its on-disk bundle are :mod:`prism_persona.gated.gate`. This module
fits the gate, splits and calibrates, and computes the metrics.

The gate returns a probability; the routing threshold is a separate number, chosen by
:func:`calibrate_threshold` on the held-out split and stored next to the weights.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Optional, Sequence

import torch
from torch import nn

from ..gated.features import query_features
from ..gated.gate import Gate, GateBundle

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# metrics


def auc(scores: Sequence[float], labels: Sequence[int]) -> Optional[float]:
    """ROC AUC via the rank-sum (Mann-Whitney U) statistic, ties given average ranks.

    ``None`` when only one class is present.
    """
    pairs = sorted(zip(scores, labels), key=lambda t: t[0])
    n_pos = sum(1 for _, y in pairs if y)
    n_neg = len(pairs) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    rank_sum = 0.0
    i = 0
    while i < len(pairs):
        j = i
        while j + 1 < len(pairs) and pairs[j + 1][0] == pairs[i][0]:
            j += 1
        avg_rank = (i + j) / 2 + 1  # ranks are 1-based
        rank_sum += avg_rank * sum(1 for k in range(i, j + 1) if pairs[k][1])
        i = j + 1
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def binary_metrics(probs: Sequence[float], labels: Sequence[int], threshold: float) -> dict:
    """accuracy, balanced accuracy, AUC, routing rate and counts at ``threshold``."""
    n = len(labels)
    pred = [p >= threshold for p in probs]
    tp = sum(1 for p, y in zip(pred, labels) if p and y)
    tn = sum(1 for p, y in zip(pred, labels) if not p and not y)
    pos = sum(1 for y in labels if y)
    neg = n - pos
    recalls = ([tp / pos] if pos else []) + ([tn / neg] if neg else [])
    return {
        "n": n, "positives": pos,
        "accuracy": (tp + tn) / n if n else None,
        # undefined (None) unless both classes are present, like AUC
        "balanced_accuracy": sum(recalls) / 2 if len(recalls) == 2 else None,
        "auc": auc(probs, labels),
        "routing_rate": sum(pred) / n if n else None,
        "threshold": float(threshold),
    }


def calibrate_threshold(probs: Sequence[float], labels: Sequence[int], method: str,
                        default: float = 0.5) -> tuple[float, str]:
    """Pick the routing threshold: ``none`` (``default``), ``balanced_accuracy`` (best on these
    held-out rows) or ``rate:X`` (route a share X). Returns (threshold, how it was chosen)."""
    method = (method or "none").strip().lower()
    if method == "none" or not probs:
        if method != "none":
            log.warning("gate: no held-out rows to calibrate on; using threshold %.2f", default)
        return float(default), "fixed"
    if method.startswith("rate:"):
        try:
            rate = float(method.split(":", 1)[1])
        except ValueError:
            from ..errors import PrismError

            raise PrismError(f"gate calibrate '{method}': the rate must be a number, e.g. rate:0.3") from None
        rate = min(max(rate, 0.0), 1.0)
        ranked = sorted(probs, reverse=True)
        k = int(round(rate * len(ranked)))
        if k <= 0:
            return float(min(1.0, ranked[0] + 1e-6)), f"rate:{rate:g}"
        return float(ranked[k - 1]), f"rate:{rate:g}"
    if method == "balanced_accuracy":
        if len(set(int(y) for y in labels)) < 2:
            log.warning("gate: held-out labels are all %d; balanced accuracy is undefined, threshold %.2f",
                        int(labels[0]), default)
            return float(default), "fixed: one class held out"
        best = (-1.0, 0.0, default)
        u = sorted(set(float(p) for p in probs))
        # midpoints between neighbouring probabilities (a threshold between the classes, not on a
        # training point), both ends, and 0.5; ties go to the candidate nearest 0.5
        candidates = [(a + b) / 2 for a, b in zip(u, u[1:])] + [u[0], min(1.0, u[-1] + 1e-6), 0.5]
        for t in candidates:
            m = binary_metrics(probs, labels, t)
            # prefer the best balanced accuracy, then the threshold nearest 0.5 (stable choice)
            key = (round(m["balanced_accuracy"], 9), -abs(t - 0.5), t)
            if key[:2] > best[:2]:
                best = key
        return float(best[2]), "balanced_accuracy"
    from ..errors import PrismError

    raise PrismError(f"unknown gate calibration '{method}'; use none, balanced_accuracy or rate:0.3")


# --------------------------------------------------------------------------------------------------
# training


def stratified_split(labels: Sequence[int], val_fraction: float, seed: int = 0,
                     groups: Optional[Sequence[str]] = None) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices), each class (and, given ``groups``, each (class, group)
    cell, e.g. per domain) split in proportion; a cell with fewer than two rows stays in training.
    Returns no held-out rows when ``val_fraction`` is 0 or the set is tiny."""
    rng = random.Random(seed)
    train, val = [], []
    cells = [(int(y), str(groups[i]) if groups is not None else "") for i, y in enumerate(labels)]
    for cell in sorted(set(cells)):
        idx = [i for i, c in enumerate(cells) if c == cell]
        rng.shuffle(idx)
        k = 0
        if val_fraction > 0 and len(idx) >= 2:
            k = int(round(len(idx) * val_fraction))
            if k == 0 and len(idx) >= 4:
                k = 1
            k = min(k, len(idx) - 1)
        val += idx[:k]
        train += idx[k:]
    return sorted(train), sorted(val)


def fit_gate(features: torch.Tensor, labels: Sequence[int], cfg, seed: int = 0) -> Gate:
    """Full-batch AdamW on BCE with ``pos_weight = negatives / positives`` (class imbalance)."""
    torch.manual_seed(seed)
    gate = Gate(features.shape[1], cfg.hidden_sizes, dropout=cfg.dropout)
    gate.set_standardisation(features)
    y = torch.tensor([float(v) for v in labels])
    pos = float(y.sum())
    neg = float(len(y) - pos)
    if len(y) == 0:
        log.warning("gate: no training rows; the gate is left at its initialisation")
        gate.eval()
        return gate
    pos_weight = torch.tensor(neg / pos if pos and neg else 1.0)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    opt = torch.optim.AdamW(gate.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gate.train()
    for _ in range(int(cfg.epochs)):
        opt.zero_grad()
        loss = loss_fn(gate.logits(features), y)
        loss.backward()
        opt.step()
    gate.eval()
    return gate


def train_gate(features: torch.Tensor, labels: Sequence[int], cfg, seed: int = 0,
               groups: Optional[Sequence[str]] = None) -> GateBundle:
    """Split, fit, calibrate the threshold on held-out rows and compute metrics; never raises on
    degenerate data (one class, a handful of rows): it logs the fallback it took instead."""
    labels = [int(y) for y in labels]
    n = len(labels)
    fallbacks: list[str] = []
    train_idx, val_idx = stratified_split(labels, cfg.val_fraction, seed, groups)
    if not val_idx and groups is not None:
        train_idx, val_idx = stratified_split(labels, cfg.val_fraction, seed)
    if not val_idx:
        fallbacks.append(f"too few rows ({n}) for a held-out split: metrics are on the training rows")
        train_idx, val_idx, val_is_train = list(range(n)), list(range(n)), True
    else:
        val_is_train = False
    if len(set(labels)) < 2:
        only = labels[0] if labels else None
        fallbacks.append(f"all labels are {only}: the gate learns a constant" if labels else "no labelled rows")
    for msg in fallbacks:
        log.warning("gate: %s", msg)
    gate = fit_gate(features[train_idx], [labels[i] for i in train_idx], cfg, seed)
    with torch.no_grad():
        probs = gate(features).tolist() if n else []
    vp = [probs[i] for i in val_idx]
    vy = [labels[i] for i in val_idx]
    threshold, how = calibrate_threshold(vp, vy, cfg.calibrate, cfg.threshold)
    info = {
        "n_train": len(train_idx), "n_heldout": 0 if val_is_train else len(val_idx),
        "positives": sum(labels), "negatives": n - sum(labels),
        "threshold_method": how, "calibrate": cfg.calibrate, "fallbacks": fallbacks,
        "metrics": {
            "train": binary_metrics([probs[i] for i in train_idx], [labels[i] for i in train_idx], threshold),
            "heldout": None if val_is_train else binary_metrics(vp, vy, threshold),
        },
        "heldout_indices": [] if val_is_train else val_idx,
    }
    if groups is not None and not val_is_train:
        info["routing_by_group"] = routing_by_group([groups[i] for i in val_idx], vp, threshold)
    return GateBundle(gate=gate, threshold=threshold, info=info)


def routing_by_group(groups: Sequence[str], probs: Sequence[float], threshold: float) -> dict:
    """{group: {"n", "routing_rate"}} for rows labelled by ``groups`` (e.g. domains)."""
    out: dict = {}
    for g, p in zip(groups, probs):
        d = out.setdefault(g, {"n": 0, "routed": 0})
        d["n"] += 1
        d["routed"] += int(p >= threshold)
    return {g: {"n": d["n"], "routing_rate": d["routed"] / d["n"]} for g, d in sorted(out.items())}


def finite(x: Optional[float]) -> Optional[float]:
    """``x`` if it is a finite number, else ``None`` (for JSON)."""
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


# --------------------------------------------------------------------------------------------------
# the stage

STAGE = "gate"
GATE_DIR = "gate"


def gate_settings(cfg) -> dict:
    """The settings the gate stage depends on (a rerun with others is refused)."""
    from dataclasses import asdict

    return {"gate": asdict(cfg.gate), "model": cfg.model.model, "seed": cfg.seed}


def run_gate(run, cfg, records: Sequence[dict], model=None, tokenizer=None) -> dict:
    """Train the gate on the labelled queries (or skip when done); writes ``RUN/gate/`` and
    ``gate.done.json``. Returns the stage summary (metrics, threshold, routing per domain)."""
    import time

    from ..models import load_model

    if run.done(STAGE):
        log.info("gate: already done, skipping (pass --redo gate to train it again)")
        return run.read_json(f"{STAGE}.done.json")
    run.check_settings(STAGE, gate_settings(cfg))
    t0 = time.perf_counter()
    if model is None:
        model, tokenizer = load_model(cfg.model.model, cfg.model.dtype, cfg.model.device, cfg.model.trust_remote_code)
    queries = [r["query"] for r in records]
    labels = [int(r["label"]) for r in records]
    feats = query_features(model, tokenizer, queries, max(1, cfg.model.batch_size))
    bundle = train_gate(feats, labels, cfg.gate, cfg.seed, groups=[r.get("domain", "") for r in records])
    heldout = bundle.info.pop("heldout_indices", [])
    bundle.info["heldout_keys"] = [records[i].get("key") for i in heldout]
    bundle.save(run.path(GATE_DIR))
    m = bundle.info["metrics"]
    info = {"threshold": bundle.threshold, "threshold_method": bundle.info["threshold_method"],
            "n_train": bundle.info["n_train"], "n_heldout": bundle.info["n_heldout"],
            "positives": bundle.info["positives"], "negatives": bundle.info["negatives"],
            "metrics": m, "routing_by_domain": bundle.info.get("routing_by_group", {}),
            "fallbacks": bundle.info["fallbacks"], "dir": str(run.path(GATE_DIR)),
            "seconds": round(time.perf_counter() - t0, 2)}
    run.mark_done(STAGE, info)
    return info
