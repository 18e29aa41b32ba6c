"""Small, dependency-free statistics shared by training and the evaluations: seeded bootstrap CIs, an
exact McNemar test, Pearson r and Spearman rho, ROC AUC and the binary metrics of a routing threshold.

Pure math on lists of numbers; it imports nothing from PRISM."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Optional

N_RESAMPLES = 1000
"""Default bootstrap resamples."""


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def bootstrap_ci(
    values: Sequence[float],
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
    stat: Callable[[Sequence[float]], float] = mean,
) -> dict:
    """``{"mean", "lo", "hi", "n"}``: the statistic and its percentile bootstrap CI.

    Seeded and deterministic. ``n == 0`` gives NaNs; ``n == 1`` gives a zero-width interval.
    """
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    point = stat(vals)
    if n == 1 or n_resamples <= 0:
        return {"mean": point, "lo": point, "hi": point, "n": n}
    rng = random.Random(seed)
    stats = sorted(stat([vals[rng.randrange(n)] for _ in range(n)]) for _ in range(n_resamples))
    alpha = (1.0 - level) / 2.0
    lo = _quantile(stats, alpha)
    hi = _quantile(stats, 1.0 - alpha)
    return {"mean": point, "lo": min(lo, point), "hi": max(hi, point), "n": n}


def paired_diff_ci(a: Sequence[float], b: Sequence[float], **kwargs) -> dict:
    """Bootstrap CI of mean(a - b) over paired values (same items)."""
    if len(a) != len(b):
        raise ValueError("paired_diff_ci needs equally long sequences")
    return bootstrap_ci([x - y for x, y in zip(a, b)], **kwargs)


def exact_mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs (each pair changed one way
    or the other): the binomial sign test of ``min(b, c)`` in ``b + c`` fair coin flips."""
    n, k = b + c, min(b, c)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted values."""
    if not sorted_vals:
        return float("nan")
    pos = q * (len(sorted_vals) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(sorted_vals) - 1)
    frac = pos - lo
    return sorted_vals[lo] * (1 - frac) + sorted_vals[hi] * frac


def pearson(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Pearson correlation; ``None`` for fewer than 2 points or a constant series."""
    if len(x) != len(y):
        raise ValueError("pearson needs equally long sequences")
    n = len(x)
    if n < 2:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties get their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        avg = (i + j) / 2.0 + 1.0
        for k in range(i, j + 1):
            out[order[k]] = avg
        i = j + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Spearman rank correlation (Pearson r of average ranks)."""
    if len(x) != len(y):
        raise ValueError("spearman needs equally long sequences")
    return pearson(ranks(x), ranks(y))


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
        "n": n,
        "positives": pos,
        "accuracy": (tp + tn) / n if n else None,
        # undefined (None) unless both classes are present, like AUC
        "balanced_accuracy": sum(recalls) / 2 if len(recalls) == 2 else None,
        "auc": auc(probs, labels),
        "routing_rate": sum(pred) / n if n else None,
        "threshold": float(threshold),
    }
