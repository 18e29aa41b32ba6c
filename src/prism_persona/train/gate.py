"""Stage 5: train the routing gate on the layer-0 features of the labelled queries.

The features come from :mod:`prism_persona.gated.features` (the same code the gated model runs inside
its prefill); the gate module and its on-disk bundle are :mod:`prism_persona.gated.gate`. This module
fits the gate, splits and calibrates, and computes the metrics.

The gate returns a probability; the routing threshold is a separate number, chosen by
:func:`calibrate_threshold` on the held-out split and stored next to the weights.

Several personas (issue 29): a run whose domains hold K >= 2 distinct persona texts
(:func:`run_personas`) trains a K-way gate (base, persona 1 ... K): a query's class is the persona that
won there, base where none did, with soft targets from the same win shares the binary gate uses. The
probabilities are calibrated by temperature scaling on the held-out split (:func:`calibrate_temperature`,
K = 1 too), with the expected calibration error before and after in the report and a reliability plot.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from ..config import RunConfig, calibration_rate, confidence_floor
from ..gated.features import query_features
from ..gated.gate import Gate, GateBundle, OODRegion, decide
from ..stats import binary_metrics
from ..text import jaccard, word_set
from . import non_finite
from .personas import personas_of_run, routed_personas, run_personas  # noqa: F401 (the one persona list)

log = logging.getLogger(__name__)


def calibrate_threshold(
    probs: Sequence[float],
    labels: Sequence[int],
    method: str,
    default: float = 0.5,
    bounds: Sequence[float] = (0.0, 1.0),
    min_rows: int = 0,
) -> tuple[float, str]:
    """Pick the routing threshold: ``none`` (``default``), ``balanced_accuracy`` (best on these
    held-out rows) or ``rate:X`` (route a share X). Returns (threshold, how it was chosen).

    A calibrated threshold is kept inside ``bounds`` (a threshold of 2.5e-16 routes everything, one of
    0.9999 nothing: both mean the held-out rows could not separate the classes); a clipped threshold
    is logged and named in ``how``. With fewer than ``min_rows`` held-out rows of either class the
    calibration is not attempted and ``default`` is used (``how`` says so)."""
    method = (method or "none").strip().lower()
    lo, hi = float(bounds[0]), float(bounds[1])
    if method == "none" or not probs:
        if method != "none":
            log.warning("gate: no held-out rows to calibrate on; using threshold %.2f", default)
            return float(default), "fixed: no held-out rows"
        return float(default), "fixed"
    rate = calibration_rate(method)
    if rate is not None:
        ranked = sorted(probs, reverse=True)
        k = int(round(rate * len(ranked)))
        t = float(min(1.0, ranked[0] + 1e-6)) if k <= 0 else float(ranked[k - 1])
        return _bounded(t, lo, hi, f"rate:{rate:g}")
    if method == "balanced_accuracy":
        pos = sum(1 for y in labels if int(y))
        neg = len(labels) - pos
        if pos == 0 or neg == 0:
            log.warning(
                "gate: held-out labels are all %d; balanced accuracy is undefined, threshold %.2f",
                int(labels[0]),
                default,
            )
            return float(default), "fixed: one class held out"
        if min(pos, neg) < min_rows:
            log.warning(
                "gate: %d positive / %d negative held-out rows are too few to calibrate on "
                "(gate.min_calibration_rows=%d); using threshold %.2f",
                pos,
                neg,
                min_rows,
                default,
            )
            return float(default), f"fixed: too few held-out rows ({pos} positive, {neg} negative)"
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
        return _bounded(float(best[2]), lo, hi, "balanced_accuracy")
    from ..errors import PrismError

    raise PrismError(f"unknown gate calibration '{method}'; use none, balanced_accuracy or rate:0.3")


def _bounded(threshold: float, lo: float, hi: float, how: str) -> tuple[float, str]:
    """``threshold`` clipped into [lo, hi], with a warning and a note in ``how`` when it was outside."""
    if lo <= threshold <= hi:
        return threshold, how
    clipped = min(max(threshold, lo), hi)
    log.warning(
        "gate: the calibrated threshold %.3g is outside gate.threshold_bounds [%g, %g]; using %g "
        "(the held-out rows do not separate the classes well)",
        threshold,
        lo,
        hi,
        clipped,
    )
    return clipped, f"{how}, clipped from {threshold:.3g}"


# --------------------------------------------------------------------------------------------------
# targets, weights and the split

TIE_WINNERS = ("tie", "mixed", "unparseable")


def gate_targets(records: Sequence[dict], target: str = "win", domain_prior: float = 0.0) -> list[float]:
    """The gate's training target per labelled record.

    ``win`` (the paper's label): 1 if the persona answer won both orders, else 0. ``preference``: 1 if
    the persona won, 0 if the base answer won, 0.5 for a tie / orders that disagree / an unreadable
    verdict, so the gate estimates how likely the persona answer is to be preferred and a threshold of
    0.5 means "route where the persona is expected to do better than the base model". ``margin``:
    the judge's both-order log-prob margin for the persona as a soft target (:func:`margin_target`;
    pairs without one, from text or rule judges, keep their 0/1 label).

    ``domain_prior`` = w blends each target with the mean target of its domain (the domain's win
    rate): ``(1 - w) * target + w * domain mean``; a noisy per-query label is pulled towards what
    the domain as a whole says, and w = 1 is one label per domain.

    A query answered several times (``answers.samples`` > 1: the record holds ``samples``) gets the
    mean of its samples' targets over the samples outside the abstain band: for ``win`` the share of
    persona wins."""
    if target not in ("win", "preference", "margin"):
        from ..errors import PrismError

        raise PrismError(f"unknown gate target '{target}'; use win, preference or margin")
    out = [record_target(r, target) for r in records]
    w = float(domain_prior or 0.0)
    if w <= 0:
        return out
    by_domain: dict = {}
    for r, t in zip(records, out):
        by_domain.setdefault(r.get("domain", ""), []).append(t)
    mean = {d: sum(ts) / len(ts) for d, ts in by_domain.items()}
    return [(1 - w) * t + w * mean[r.get("domain", "")] for r, t in zip(records, out)]


def record_target(record: dict, target: str) -> float:
    """:func:`gate_targets` of one record (the mean over its answer samples when it has several)."""
    samples = [x for x in record.get("samples") or () if not x.get("abstain")]
    if samples:
        return sum(_pair_target(x, target) for x in samples) / len(samples)
    return _pair_target(record, target)


def _pair_target(r: dict, target: str) -> float:
    if target == "win":
        return float(int(r["label"]))
    if target == "preference":
        w = r.get("winner")
        return 1.0 if int(r["label"]) else 0.0 if w == "base" else 0.5 if w in TIE_WINNERS else 0.0
    return margin_target(r)


MARGIN_SCALE = 1.0
"""``margin`` target: sigmoid(margin / MARGIN_SCALE); a margin of 1 nat is a 73 % target."""


def margin_target(record: dict) -> float:
    """The judge's both-order log-prob margin for the persona as a soft target in (0, 1); a pair
    without a margin (text or rule judge) keeps its 0/1 label."""
    m = record.get("margin")
    if m is None:
        return float(int(record["label"]))
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, float(m))) / MARGIN_SCALE))


def gate_records(records: Sequence[dict]) -> list[dict]:
    """The labelled records the gate trains on: all but those in the judge's abstain band
    (``judge.abstain_margin``: the judge barely preferred either answer)."""
    return [r for r in records if not r.get("abstain")]


def sample_weights(labels: Sequence[int], groups: Optional[Sequence[str]], balance: str) -> torch.Tensor:
    """Per-row loss weights (mean 1). ``class``: every label (class) weighs the same in total; ``domain``: every
    (domain, label) cell weighs the same in total, so a domain with many queries or a lopsided win rate
    does not dominate; ``none``: every row weighs 1."""
    n = len(labels)
    if n == 0 or balance == "none":
        return torch.ones(n)
    if balance == "class":
        cells = [str(int(y)) for y in labels]
    elif balance == "domain":
        g = groups if groups is not None else [""] * n
        cells = [f"{g[i]}\x00{int(y)}" for i, y in enumerate(labels)]
    else:
        from ..errors import PrismError

        raise PrismError(f"unknown gate balance '{balance}'; use class, domain or none")
    counts: dict = {}
    for c in cells:
        counts[c] = counts.get(c, 0) + 1
    w = torch.tensor([1.0 / counts[c] for c in cells])
    return w * (n / float(w.sum()))


def near_duplicate_clusters(texts: Sequence[str], threshold: float) -> list[int]:
    """A cluster id per text; texts whose word sets overlap by Jaccard >= ``threshold`` (or that are
    equal after lower-casing) share a cluster (transitively), so a split never puts one near-duplicate
    in training and another in the held-out rows. ``threshold`` >= 1 clusters exact duplicates only."""
    words = [word_set(t) for t in texts]
    parent = list(range(len(texts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(texts)):
        for j in range(i):
            a, b = words[i], words[j]
            same = texts[i].strip().lower() == texts[j].strip().lower()
            if same or jaccard(a, b) >= threshold:
                parent[find(i)] = find(j)
    return [find(i) for i in range(len(texts))]


def stratified_split(
    labels: Sequence[int],
    val_fraction: float,
    seed: int = 0,
    groups: Optional[Sequence[str]] = None,
    clusters: Optional[Sequence[int]] = None,
) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices), each class (and, given ``groups``, each (class, group)
    cell, e.g. per domain) split in proportion; a cell with fewer than two rows stays in training.
    Given ``clusters`` (e.g. :func:`near_duplicate_clusters`), a cluster goes wholly to one side (it
    is placed by the cell of its first row). Returns no held-out rows when ``val_fraction`` is 0 or
    the set is tiny."""
    rng = random.Random(seed)
    n = len(labels)
    clusters = list(clusters) if clusters is not None else list(range(n))
    members: dict = {}
    for i, c in enumerate(clusters):
        members.setdefault(c, []).append(i)
    cells = [(int(y), str(groups[i]) if groups is not None else "") for i, y in enumerate(labels)]
    train, val = [], []
    for cell in sorted(set(cells)):
        units = [m for c, m in members.items() if cells[m[0]] == cell]
        units.sort(key=lambda m: m[0])
        rng.shuffle(units)
        size = sum(len(m) for m in units)
        k = 0
        if val_fraction > 0 and size >= 2 and len(units) >= 2:
            k = int(round(size * val_fraction))
            if k == 0 and size >= 4:
                k = 1
            k = min(k, size - 1)
        taken = 0
        for m in units:
            if taken < k and taken + len(m) < size:
                val += m
                taken += len(m)
            else:
                train += m
    return sorted(train), sorted(val)


# --------------------------------------------------------------------------------------------------
# the abstain region (issue 29)

OOD_FOLDS = 5
"""Folds of the cross-fitted in-distribution distances the abstain threshold is a quantile of."""


OOD_MIN_ROWS = 4
"""An abstain region (``gate.ood``) or everyday region (``gate.ood_contrast``) needs at least this many rows."""

OOD_MIN_ROUTED = 8
"""``gate.ood_reference = routed`` with fewer routed training queries than this fits on every query."""


def ood_reference_rows(labels: Sequence[int], reference: str) -> list[int]:
    """The rows the abstain region is fitted on: those labelled 1 (``routed``; every row when fewer than
    :data:`OOD_MIN_ROUTED`, with a log line) or every row (``all``)."""
    every = list(range(len(labels)))
    if reference != "routed":
        return every
    pos = [i for i, y in enumerate(labels) if int(y)]
    if len(pos) < OOD_MIN_ROUTED:
        log.info("gate: %d routed training queries: the abstain region is fitted on all %d", len(pos), len(labels))
        return every
    return pos


def crossfit_scores(z: torch.Tensor, method: str, k: int, seed: int, clusters: Sequence[int]) -> torch.Tensor:
    """The distance of each row of ``z`` from a region fitted without its fold (:data:`OOD_FOLDS` folds;
    near-duplicate ``clusters`` stay in one fold)."""
    units = sorted(set(clusters))
    folds = min(OOD_FOLDS, len(units))
    rng = random.Random(seed)
    rng.shuffle(units)
    fold_of = {u: i % folds for i, u in enumerate(units)}
    fold = torch.tensor([fold_of[c] for c in clusters])
    scores = torch.empty(z.shape[0])
    for f in range(folds):
        held = fold == f
        scores[held] = OODRegion.fit(method, z[~held], k).score(z[held])
    return scores


def fit_ood(
    gate: Gate,
    features: torch.Tensor,
    method: str,
    quantile: float,
    k: int,
    seed: int = 0,
    clusters: Optional[Sequence[int]] = None,
    scale: float = 1.0,
) -> tuple[Optional[OODRegion], dict]:
    """The gate's abstain region over ``features`` (all its labelled queries, in its standardised space)
    and a description for ``gate_config.json``.

    The threshold is the ``quantile`` of cross-fitted distances: the rows are cut into
    :data:`OOD_FOLDS` folds (near-duplicate ``clusters`` stay in one fold), each fold is scored by a region
    fitted on the others, so a training query is not its own neighbour. The stored region is then fitted
    on every row (slightly tighter than the folds' regions: in-distribution queries abstain a little
    less than ``1 - quantile``). ``method`` 'off' or fewer than 4 rows: no region (``None``)."""
    n = int(features.shape[0])
    if method == "off":
        return None, {"method": "off"}
    cl = list(clusters) if clusters is not None else list(range(n))
    units = sorted(set(cl))
    folds = min(OOD_FOLDS, len(units))
    if n < OOD_MIN_ROWS or folds < 2:
        log.warning("gate: %d rows are too few to fit the abstain region (gate.ood); abstain is off", n)
        return None, {"method": "off", "note": f"too few rows ({n}) for an abstain region"}
    with torch.no_grad():
        z = gate.standardise(features).float()
    scores = crossfit_scores(z, method, k, seed, cl)
    threshold = float(torch.quantile(scores, float(quantile)))
    region = OODRegion.fit(method, z, k)
    region.limit = threshold * float(scale)  # gate.ood_scale: room beyond the farthest training query
    inside = float((region.score(z) <= threshold).float().mean())
    info = {
        **region.settings(),
        "quantile": float(quantile),
        "scale": float(scale),
        "folds": folds,
        "crossfit_inside_rate": float((scores <= threshold).float().mean()),
        "train_inside_rate": inside,
    }
    return region, info


def fit_contrast(
    gate: Gate,
    features: torch.Tensor,
    everyday: torch.Tensor,
    method: str,
    quantile: float,
    k: int,
    seed: int = 0,
    clusters: Optional[Sequence[int]] = None,
) -> tuple[Optional[OODRegion], dict]:
    """The everyday region ``gate.ood_contrast`` compares with (:meth:`Gate.outside`), fitted on the
    ``everyday`` queries' features in the gate's standardised space (the gate's mean and spread stay the
    run's). A query is outside when its distance to the wins' region over its distance to the everyday
    region exceeds this region's limit: the ``quantile`` of that ratio over the wins' own rows
    (``features``, the reference :func:`fit_ood` fitted; their distance to the wins' region cross-fitted
    with the same folds, ``clusters`` and ``seed``), so no new setting: a query is routed only if it is
    no more typical of everyday requests, relative to the wins, than the wins themselves were. None when
    the gate has no abstain region (``gate.ood = off``); with fewer than :data:`OOD_MIN_ROWS` rows in
    either set also None, logged and noted (the wins' region alone, as :func:`fit_ood` does)."""
    n, m = int(features.shape[0]), int(everyday.shape[0])
    cl = list(clusters) if clusters is not None else list(range(n))
    if gate.ood is None or method == "off":
        return None, {"method": "off"}
    if m < OOD_MIN_ROWS or n < OOD_MIN_ROWS or len(set(cl)) < 2:
        log.warning("gate: %d everyday queries, %d wins: too few for the everyday region (gate.ood_contrast)", m, n)
        return None, {"method": "off", "note": f"too few rows ({m} everyday, {n} reference) for the everyday region"}
    with torch.no_grad():
        z = gate.standardise(features).float()
        region = OODRegion.fit(method, gate.standardise(everyday).float(), k)
        wins = crossfit_scores(z, gate.ood.method, gate.ood.k, seed, cl)
        ratio = wins / region.score(z).clamp_min(1e-12)
    region.limit = float(torch.quantile(ratio, float(quantile)))
    info = {**region.settings(), "everyday_rows": m, "score": "wins distance / everyday distance"}
    return region, info


# --------------------------------------------------------------------------------------------------
# base examples (issue 29): queries that should stay on the base model, label 0

BUILTIN_BASE_QUERIES = "base_queries.txt"
"""Package data (``prism_persona/data/``): everyday requests and knowledge questions of no persona's domain."""

MAX_BASE_QUERIES = 20_000
"""A base-queries file with more queries than this is refused (each costs a layer-0 forward pass)."""


def _query_lines(text: str, where: str, jsonl: bool) -> list[str]:
    """The queries of a base-queries file: one per line (``#`` comments and blank lines skipped), or
    JSON Lines with ``query``/``prompt`` (or a plain JSON string) per line."""
    from ..config import MAX_TEXT_CHARS
    from ..errors import PrismError
    from ..userfiles import jsonl_rows

    out: list[str] = []
    if jsonl:
        rows = jsonl_rows(text, lambda n, why: f"{where} line {n} is not valid JSON ({why})")
    else:
        rows = ((n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip() and not line.startswith("#"))
    for n, row in rows:
        q = row if isinstance(row, str) else None
        if isinstance(row, dict):
            q = next((row[k] for k in ("query", "prompt") if isinstance(row.get(k), str)), None)
        if q is None or not q.strip():
            raise PrismError(f"{where} line {n}: expected a non-empty query ('query' in a JSON object)")
        if len(q) > MAX_TEXT_CHARS:
            raise PrismError(f"{where} line {n}: the query has {len(q)} characters; at most {MAX_TEXT_CHARS}")
        out.append(q.strip())
        if len(out) > MAX_BASE_QUERIES:
            raise PrismError(f"{where} has more than {MAX_BASE_QUERIES} queries; give at most that many")
    return out


def builtin_base_queries() -> list[str]:
    """The base examples shipped with PRISM (``gate.base_queries = builtin``)."""
    from importlib.resources import files

    text = (files("prism_persona") / "data" / BUILTIN_BASE_QUERIES).read_text(encoding="utf-8")
    return _query_lines(text, BUILTIN_BASE_QUERIES, jsonl=False)


QUERIES_FILE_NAMES = {"base_queries": "base queries file", "ood_contrast": "everyday queries file"}
"""What the errors call the file of each setting of ``config.QUERIES_FILE_SETTINGS``."""


def read_base_queries(path: str, setting: str = "base_queries") -> list[str]:
    """The queries of a user's file for ``gate.<setting>`` (``gate.base_queries`` or ``gate.ood_contrast``;
    .jsonl: JSON Lines, anything else: one per line); one-line errors for a missing, non-UTF-8, empty or
    malformed file or an over-long query."""
    from pathlib import Path

    from ..errors import PrismError
    from ..userfiles import read_user_text

    p, what = Path(path).expanduser(), QUERIES_FILE_NAMES[setting]
    text = read_user_text(p, f"{what} (gate.{setting})")
    out = _query_lines(text, str(p), jsonl=p.suffix.lower() == ".jsonl")
    if not out:
        raise PrismError(f"{what} {p} (gate.{setting}) holds no queries")
    return out


def base_queries(spec: str, setting: str = "base_queries") -> list[str]:
    """The queries ``gate.<setting>`` names (:func:`read_base_queries`): the built-in list, none ('off')
    or a file's."""
    from ..config import is_queries_file

    if is_queries_file(spec):
        return read_base_queries(spec, setting)
    return builtin_base_queries() if str(spec).strip().lower() == "builtin" else []


def base_queries_fingerprint(spec: str, setting: str = "base_queries") -> str:
    """What the gate stage depends on: a hash of the queries ``gate.<setting>`` names (a file's or the
    built-in list's)."""
    import hashlib

    return hashlib.sha1("\n".join(base_queries(spec, setting)).encode("utf-8")).hexdigest()[:16]


def new_base_queries(queries: Sequence[str], run_queries: Sequence[str]) -> list[str]:
    """``queries`` without duplicates and without those equal (ignoring case and spaces) to a query of
    the run: a labelled query keeps its own label."""
    seen = {" ".join(q.lower().split()) for q in run_queries}
    out = []
    for q in queries:
        key = " ".join(q.lower().split())
        if key not in seen:
            seen.add(key)
            out.append(q)
    return out


def with_base_rows(
    features: torch.Tensor,
    targets: Sequence[float],
    weights: torch.Tensor,
    base_features: Optional[torch.Tensor],
    cells: int,
) -> tuple[torch.Tensor, list[float], torch.Tensor]:
    """The training rows plus the base examples (target 0). Together the base rows weigh as much as one
    (domain, label) cell of the run's rows on average (``weights.sum() / cells``): as many of them as
    there are never outweigh the run's own queries, and with ``balance = domain`` they are one more cell."""
    if base_features is None or base_features.shape[0] == 0 or features.shape[0] == 0:
        return features, targets if isinstance(targets, torch.Tensor) else list(targets), weights
    m = base_features.shape[0]
    total = float(weights.sum()) / max(1, cells)
    x = torch.cat([features, base_features.to(features.dtype)])
    if isinstance(targets, torch.Tensor):  # K-way soft targets [n, K + 1]: base rows are class 0
        base = torch.zeros(m, targets.shape[1], dtype=targets.dtype)
        base[:, 0] = 1.0
        y = torch.cat([targets, base])
    else:
        y = list(targets) + [0.0] * m
    return x, y, torch.cat([weights, torch.full((m,), total / m)])


def label_cells(labels: Sequence[int], groups: Optional[Sequence[str]]) -> int:
    """The number of (domain, label) cells of the run's rows (labels only without groups)."""
    g = groups if groups is not None else [""] * len(labels)
    return len({(g[i], int(y)) for i, y in enumerate(labels)})


# --------------------------------------------------------------------------------------------------
# calibration of the probabilities (issue 29): temperature scaling, ECE, the abstain confidence

ECE_BINS = 10
"""Equal-width confidence bins of the expected calibration error and the reliability plot."""

MIN_TEMPERATURE_ROWS = 6
"""Fewer held-out rows than this (or one class among them): no temperature is fitted (it stays 1)."""

TEMPERATURE_RANGE = (1.0, 20.0)
"""The temperatures the fit searches (golden section on the log of 1 / T). It only softens (T >= 1): the
held-out split is the bootstrap's own queries, and a sharper gate (T < 1) fitted there raised the
calibration error on the kits' hand-written held-out queries (K-way 0.070 -> 0.083, the style kit's
binary gate 0.224 -> 0.285; scripts/kway_gate_study.py, docs/gated.md)."""

AUTO_CONFIDENCE_ACCURACY = 0.5
"""``gate.min_confidence = auto``: the routed persona must be right at least this often from the chosen
confidence up (on the held-out rows the gate routes, calibrated, cross-fitted)."""


def top_label(class_probs: torch.Tensor, labels: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, correct) per row: the most probable class's probability, and whether it is the label."""
    conf, pred = class_probs.max(-1)
    return conf, (pred == torch.as_tensor(list(labels), dtype=torch.long)).float()


def reliability_bins(conf: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> list[dict]:
    """Equal-width bins of ``conf`` over [0, 1]: ``lo``, ``hi``, ``n``, mean ``confidence`` and ``accuracy``."""
    out = []
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = (conf > lo) & (conf <= hi) if b else (conf >= lo) & (conf <= hi)
        n = int(inside.sum())
        out.append(
            {
                "lo": lo,
                "hi": hi,
                "n": n,
                "confidence": float(conf[inside].mean()) if n else None,
                "accuracy": float(correct[inside].mean()) if n else None,
            }
        )
    return out


def expected_calibration_error(conf: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS) -> Optional[float]:
    """ECE: the row-weighted mean over :func:`reliability_bins` of ``|accuracy - confidence|``; None without rows."""
    n = int(conf.numel())
    if n == 0:
        return None
    rows = reliability_bins(conf, correct, bins)
    return float(sum(b["n"] * abs(b["accuracy"] - b["confidence"]) for b in rows if b["n"]) / n)


def fit_temperature(logits: torch.Tensor, labels: Sequence[int]) -> float:
    """The temperature T minimising the mean negative log-likelihood of ``labels`` under
    ``softmax(logits / T)`` (``logits`` [n, C]); convex in 1 / T, found by golden section."""
    y = torch.as_tensor(list(labels), dtype=torch.long)
    z = logits.detach().float()

    def nll(log_beta: float) -> float:
        return float(nn.functional.cross_entropy(z * math.exp(log_beta), y))

    a, b = -math.log(TEMPERATURE_RANGE[1]), -math.log(TEMPERATURE_RANGE[0])
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(80):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(d)
    t = math.exp(-(a + b) / 2)
    lo, hi = TEMPERATURE_RANGE
    # at a bound the search stops a hair inside it: T = 1 means "no change", exactly
    return float(lo if t < lo * 1.001 else hi if t > hi / 1.001 else t)


def calibrate_temperature(
    logits: torch.Tensor, labels: Sequence[int], method: str = "fit", seed: int = 0
) -> tuple[float, dict, torch.Tensor]:
    """Temperature scaling on held-out rows: ``logits`` [n, C] (before any temperature), ``labels`` the
    class of each row. Returns (temperature, report, calibrated probabilities [n, C]).

    The temperature kept is fitted on every row. The report's ``ece_after`` (and the probabilities
    returned) are cross-fitted: the rows are cut in two halves, each scored with the temperature fitted on
    the other, so the error after calibration is not measured on the rows it was fitted on. ``method``
    'off', fewer than :data:`MIN_TEMPERATURE_ROWS` rows or a single class: temperature 1 (``note`` says why)."""
    labels = [int(y) for y in labels]
    n = len(labels)
    before = torch.softmax(logits.float(), -1)
    conf0, ok0 = top_label(before, labels)
    report: dict = {
        "method": "temperature",
        "bins": ECE_BINS,
        "n": n,
        "ece_before": expected_calibration_error(conf0, ok0),
        "reliability_before": reliability_bins(conf0, ok0),
    }
    why = None
    if method == "off":
        why = "gate.temperature = off"
    elif n < MIN_TEMPERATURE_ROWS:
        why = f"too few held-out rows ({n}) to fit a temperature"
    elif len(set(labels)) < 2:
        why = "the held-out rows hold one class"
    if why is not None:
        report.update(method="none", temperature=1.0, note=why, ece_after=report["ece_before"])
        report["reliability_after"] = report["reliability_before"]
        return 1.0, report, before
    temperature = fit_temperature(logits, labels)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    halves = [sorted(order[: n // 2]), sorted(order[n // 2 :])]
    after = torch.empty_like(before)
    for i, part in enumerate(halves):
        other = halves[1 - i]
        t = fit_temperature(logits[other], [labels[j] for j in other])
        after[part] = torch.softmax(logits[part].float() / t, -1)
    conf1, ok1 = top_label(after, labels)
    report.update(
        temperature=temperature,
        ece_after=expected_calibration_error(conf1, ok1),
        ece_after_note="cross-fitted: each half of the held-out rows scored with the temperature of the other",
        reliability_after=reliability_bins(conf1, ok1),
    )
    return temperature, report, after


def auto_min_confidence(
    class_probs: torch.Tensor, labels: Sequence[int], threshold: float, bins: int = ECE_BINS
) -> tuple[float, str]:
    """``gate.min_confidence = auto`` (K-way gate): from the reliability curve of the persona choice on the
    held-out rows the gate routes (routing probability >= threshold) where a persona won (right = that persona
    is the most probable one), the lower edge of the lowest confidence bin from which every non-empty bin up is right at least
    :data:`AUTO_CONFIDENCE_ACCURACY` of the time (0: nothing abstains). Returns (floor, how)."""
    y_all = torch.as_tensor(list(labels), dtype=torch.long)
    # the persona choice is judged where a persona won: a routed base row is the threshold's error, not
    # the choice's (counted as wrong, a split with few wins pushed the floor to 1: nothing ever routed)
    best = class_probs[:, 1:].max(-1).values  # the routing probability from probabilities (routing_probability)
    wanted = (best / (best + class_probs[:, 0]).clamp_min(1e-30) >= threshold) & (y_all > 0)
    if not bool(wanted.any()):
        return 0.0, "auto: no routed held-out row where a persona won, no confidence floor"
    pc = class_probs[wanted]
    conf, best = pc[:, 1:].max(-1)
    y = y_all[wanted]
    right = (y == best + 1).float()
    rows = reliability_bins(conf, right, bins)
    floor = 0.0
    for b in rows:
        if b["n"] and b["accuracy"] < AUTO_CONFIDENCE_ACCURACY:
            floor = b["hi"]
    floor = min(floor, 1.0)
    return (
        floor,
        f"auto: {int(wanted.sum())} routed held-out rows where a persona won, persona right >= {AUTO_CONFIDENCE_ACCURACY:g} from {floor:g} up",
    )


def confusion(gate: Gate, threshold: float, features: torch.Tensor, classes: Sequence[int]) -> list[list[int]]:
    """``matrix[true][decided]`` over classes (0 = base, k = persona k): the decision is :func:`decide`'s
    (abstain rules included), the true class the persona that won (base where none did)."""
    k = gate.personas + 1
    matrix = [[0] * k for _ in range(k)]
    if features.shape[0] == 0:
        return matrix
    with torch.no_grad():
        d = decide(gate, threshold, features)
    for t, p in zip(classes, (d.persona + 1).tolist()):
        matrix[int(t)][int(p)] += 1
    return matrix


def plot_reliability(calibration: dict, png, title: str = "gate calibration"):
    """The reliability diagram (accuracy per confidence bin, before and after temperature scaling) to a
    PNG (matplotlib, Agg backend); ``None`` if matplotlib is absent or there is nothing to plot."""
    if not calibration or not calibration.get("n"):
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; no reliability plot")
        return None
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="perfect calibration")
    for key, name, marker in (("before", "before", "o"), ("after", "after (cross-fitted)", "s")):
        rows = [b for b in calibration.get(f"reliability_{key}", []) if b["n"]]
        ece = calibration.get(f"ece_{key}")
        label = f"{name}: ECE {ece:.3f}" if isinstance(ece, (int, float)) else name
        ax.plot([b["confidence"] for b in rows], [b["accuracy"] for b in rows], marker=marker, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (most probable class)")
    ax.set_ylabel("accuracy (held-out)")
    t = calibration.get("temperature", 1.0)
    ax.set_title(f"{title}, T = {t:.2f}, n = {calibration['n']}")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


# --------------------------------------------------------------------------------------------------
# training


def _weighted_bce(gate: Gate, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted BCE (binary gate, ``y`` [n]) or weighted soft cross-entropy (K-way, ``y`` [n, K + 1])."""
    if y.dim() == 1:
        loss = nn.functional.binary_cross_entropy_with_logits(gate.logits(x), y, reduction="none")
    else:
        loss = -(y * torch.log_softmax(gate.logits(x), dim=-1)).sum(-1)
    return (loss * w).sum() / w.sum().clamp_min(1e-12)


def _target_tensor(targets) -> torch.Tensor:
    """Targets as a tensor: a list of floats (binary gate) or a ``[n, K + 1]`` tensor (K-way) as is."""
    if isinstance(targets, torch.Tensor):
        return targets.float()
    return torch.tensor([float(v) for v in targets])


def fit_gate(
    features: torch.Tensor,
    targets: Sequence[float],
    cfg,
    seed: int = 0,
    weights: Optional[torch.Tensor] = None,
    val: Optional[tuple] = None,
    standardise_on: Optional[torch.Tensor] = None,
) -> Gate:
    """Full-batch AdamW on weighted BCE (``targets`` may be soft, e.g. 0.5 for a tie).

    ``weights``: per-row loss weights (default: both labels weigh the same, as ``pos_weight`` did).
    ``val`` = (features, targets, weights) of held-out rows: with ``cfg.patience`` > 0 training stops
    once their loss has not improved for that many epochs, and the best epoch's weights are kept
    (``gate.stopped_epoch`` / ``gate.best_epoch`` record it). ``standardise_on``: the rows whose mean
    and spread standardise the features (default ``features``; the run's own rows when base examples
    are added, so that they do not stretch the space the run's queries are told apart in)."""
    torch.manual_seed(seed)
    y = _target_tensor(targets)
    personas = 1 if y.dim() == 1 else y.shape[1] - 1
    gate = Gate(features.shape[1], cfg.hidden_sizes, dropout=cfg.dropout, pooling=cfg.pooling, personas=personas)
    gate.set_standardisation(features if standardise_on is None else standardise_on)
    gate.best_epoch = gate.stopped_epoch = 0
    if len(y) == 0:
        log.warning("gate: no training rows; the gate is left at its initialisation")
        gate.eval()
        return gate
    hard = [int(v >= 1.0) for v in targets] if y.dim() == 1 else y.argmax(-1).tolist()
    w = weights if weights is not None else sample_weights(hard, None, "class")
    # start from the (weighted) base rate: output layer zero, bias = its logit (one class -> a constant)
    out_layer = gate.mlp[-1]
    with torch.no_grad():
        out_layer.weight.zero_()
        if y.dim() == 1:
            prior = float((w * y).sum() / w.sum().clamp_min(1e-12))
            clipped = min(max(prior, 1e-4), 1 - 1e-4)
            out_layer.bias.fill_(math.log(clipped / (1 - clipped)))
        else:
            out_layer.bias.copy_(((w[:, None] * y).sum(0) / w.sum().clamp_min(1e-12)).clamp_min(1e-4).log())
    opt = torch.optim.AdamW(gate.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    patience = int(cfg.patience)
    use_val = val is not None and len(val[1]) > 0 and patience > 0
    best_loss, best_state, best_epoch, epoch = math.inf, None, 0, 0
    for epoch in range(1, int(cfg.epochs) + 1):
        gate.train()
        opt.zero_grad()
        loss = _weighted_bce(gate, features, y, w)
        loss.backward()
        opt.step()
        check_finite(loss, gate.parameters(), epoch, cfg)
        if use_val:
            gate.eval()
            with torch.no_grad():
                vloss = float(_weighted_bce(gate, val[0], _target_tensor(val[1]), val[2]))
            if vloss < best_loss - 1e-6:
                best_loss, best_epoch = vloss, epoch
                best_state = {k: v.detach().clone() for k, v in gate.state_dict().items()}
            elif epoch - best_epoch >= patience:
                break
    if best_state is not None:
        gate.load_state_dict(best_state)
    gate.best_epoch = best_epoch if use_val else epoch
    gate.stopped_epoch = epoch
    gate.eval()
    return gate


def check_finite(loss: torch.Tensor, params, epoch: int, cfg) -> None:
    """One line, naming the settings, when an epoch made the loss or a gate weight NaN or infinite
    (nothing non-finite is ever saved)."""
    bad = non_finite(loss.detach(), params)
    if bad:
        from ..errors import PrismError

        raise PrismError(
            f"gate training diverged at epoch {epoch}: the {bad} became non-finite with gate.lr={cfg.lr} and "
            f"gate.weight_decay={cfg.weight_decay}; lower gate.lr (nothing was saved)"
        )


def train_gate(
    features: torch.Tensor,
    labels: Sequence[int],
    cfg,
    seed: int = 0,
    groups: Optional[Sequence[str]] = None,
    targets: Optional[Sequence[float]] = None,
    texts: Optional[Sequence[str]] = None,
    base_features: Optional[torch.Tensor] = None,
    personas: Optional[Sequence[int]] = None,
    persona_list: Optional[Sequence[dict]] = None,
    everyday: Optional[torch.Tensor] = None,
) -> GateBundle:
    """Split, fit, calibrate the probabilities (temperature) and the threshold on held-out rows and compute
    metrics; never raises on degenerate data (one class, a handful of rows): it logs the fallback it took instead.

    ``persona_list`` with K >= 2 entries (:func:`run_personas`) and ``personas`` (the index in it of the
    persona tried on each row): a K-way gate; a row's class is its persona + 1 where it won, else 0 (base),
    its soft target ``1 - t`` on base and ``t`` on its persona (``t``: the binary target). Otherwise the
    binary gate.

    ``labels``: 1 = the persona won (metrics and calibration use these); ``targets``: what the gate is
    fitted to (default: ``labels``; see :func:`gate_targets`); ``groups``: the domain of each row
    (stratified split, ``balance=domain``, routing per domain); ``texts``: the queries, so that
    near-duplicates stay on one side of the split; ``base_features``: base examples (label 0), added
    to the training rows only (:func:`with_base_rows`), never to the held-out split or the abstain region;
    ``everyday``: the features of the everyday queries ``gate.ood_contrast`` fits its region on
    (:func:`fit_contrast`; never in the probability)."""
    labels = [int(y) for y in labels]
    targets = [float(t) for t in (targets if targets is not None else labels)]
    n = len(labels)
    k = len(persona_list) if persona_list is not None and personas is not None and len(persona_list) >= 2 else 1
    if k > 1:  # a row of no listed persona (-1) is a base row, whatever its label
        classes = [(int(personas[i]) + 1) * y if int(personas[i]) >= 0 else 0 for i, y in enumerate(labels)]  # type: ignore[index]
    else:
        classes = labels
    fallbacks: list[str] = []
    dedup = float(cfg.dedup_jaccard)
    clusters = near_duplicate_clusters(texts, dedup) if texts is not None else None
    train_idx, val_idx = stratified_split(labels, cfg.val_fraction, seed, groups, clusters)
    if not val_idx and groups is not None:
        train_idx, val_idx = stratified_split(labels, cfg.val_fraction, seed, None, clusters)
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
    balance = cfg.balance
    weights = sample_weights(classes, groups, balance)
    if k > 1:
        soft = torch.zeros(n, k + 1)
        for i, t in enumerate(targets):
            j = int(personas[i])  # type: ignore[index]
            soft[i, 0], soft[i, j + 1] = (1.0 - t, t) if j >= 0 else (1.0, 0.0)
        pick = lambda idx, seq: seq[idx] if isinstance(seq, torch.Tensor) else [seq[i] for i in idx]  # noqa: E731
        fit_targets: object = soft
    else:
        pick = lambda idx, seq: [seq[i] for i in idx]  # noqa: E731
        fit_targets = targets
    val = None if val_is_train else (features[val_idx], pick(val_idx, fit_targets), weights[val_idx])
    x_fit, t_fit, w_fit = with_base_rows(
        features[train_idx],
        pick(train_idx, fit_targets),
        weights[train_idx],
        base_features,
        label_cells(labels, groups),
    )
    gate = fit_gate(x_fit, t_fit, cfg, seed, w_fit, val, standardise_on=features[train_idx])
    with torch.no_grad():
        val_logits = gate.class_logits(features[val_idx], temperature=1.0) if n else torch.zeros(0, k + 1)
    temperature, calibration, val_class_probs = calibrate_temperature(
        val_logits, [classes[i] for i in val_idx], "off" if val_is_train else cfg.temperature, seed
    )
    if val_is_train:
        calibration["note"] = "no held-out split: no temperature fitted"
    gate.temperature = temperature
    with torch.no_grad():
        probs = gate(features).tolist() if n else []
    vp = [probs[i] for i in val_idx]
    vy = [labels[i] for i in val_idx]
    threshold, how = calibrate_threshold(
        vp,
        vy,
        cfg.calibrate,
        cfg.threshold,
        cfg.threshold_bounds,
        int(cfg.min_calibration_rows),
    )
    if how.startswith("fixed:") or "clipped" in how:
        fallbacks.append(f"threshold {threshold:.3g}: {how}")
    ref = ood_reference_rows(labels, cfg.ood_reference)
    region, ood_info = fit_ood(
        gate,
        features[ref],
        cfg.ood,
        cfg.ood_quantile,
        cfg.ood_k,
        seed,
        [clusters[i] for i in ref] if clusters is not None else None,
        cfg.ood_scale,
    )
    if cfg.ood != "off":
        ood_info["reference"] = "routed" if len(ref) < n else "all"
    gate.ood = region
    if everyday is not None and cfg.ood_contrast != "off":
        gate.ood_contrast, ood_info["contrast"] = fit_contrast(
            gate,
            features[ref],
            everyday,
            cfg.ood,
            cfg.ood_quantile,
            cfg.ood_k,
            seed,
            [clusters[i] for i in ref] if clusters is not None else None,
        )
    kway: dict = {}
    if k > 1:
        floor = confidence_floor(cfg.min_confidence)
        how_floor = "set" if floor is not None else ""
        if floor is None:
            floor, how_floor = auto_min_confidence(val_class_probs, [classes[i] for i in val_idx], threshold)
        gate.min_confidence = float(floor)
        kway = {
            "personas": [dict(p) for p in persona_list],  # type: ignore[union-attr]
            "min_confidence_method": how_floor,
            "class_counts": [sum(1 for c in classes if c == j) for j in range(k + 1)],
        }
        if not val_is_train:
            kway["confusion"] = {
                "classes": ["base"] + [str(p.get("name", i)) for i, p in enumerate(persona_list)],  # type: ignore[union-attr]
                "matrix": confusion(gate, threshold, features[val_idx], [classes[i] for i in val_idx]),
                "note": "held-out split: rows = the class that won, columns = the gate's decision",
            }
    info = {
        "n_train": len(train_idx),
        "n_heldout": 0 if val_is_train else len(val_idx),
        "positives": sum(labels),
        "negatives": n - sum(labels),
        "threshold_method": how,
        "calibrate": cfg.calibrate,
        "fallbacks": fallbacks,
        "target": cfg.target,
        "balance": balance,
        "pooling": gate.pooling,
        "epochs_run": gate.stopped_epoch,
        "best_epoch": gate.best_epoch,
        "near_duplicate_clusters": len(set(clusters)) if clusters is not None else n,
        "ood_fit": ood_info,
        "base_examples": int(base_features.shape[0]) if base_features is not None and n else 0,
        # these rows come from the bootstrap's own queries: in-distribution, and used for early
        # stopping and calibration; `prism check` measures the gate on queries it never saw
        "metrics_note": "in-distribution: the held-out split of the bootstrap's own queries",
        "metrics": {
            "train": binary_metrics([probs[i] for i in train_idx], [labels[i] for i in train_idx], threshold),
            "heldout": None if val_is_train else binary_metrics(vp, vy, threshold),
        },
        "heldout_indices": [] if val_is_train else val_idx,
        "calibration": calibration,
        **kway,
    }
    if groups is not None and not val_is_train:
        info["routing_by_group"] = routing_by_group([groups[i] for i in val_idx], vp, threshold)
    return GateBundle(gate=gate, threshold=threshold, info=info)


def train_gate_on_records(
    features: torch.Tensor,
    records: Sequence[dict],
    gcfg,
    seed: int = 0,
    base_features: Optional[torch.Tensor] = None,
    persona_list: Optional[Sequence[dict]] = None,
    everyday: Optional[torch.Tensor] = None,
) -> GateBundle:
    """:func:`train_gate` on labelled records (``query``, ``label``, ``domain`` and what the target
    reads): labels, domains as groups, the ``gcfg.target`` / ``gcfg.domain_prior`` targets, queries as
    texts; ``base_features``: the base examples' features (label 0). ``persona_list``
    (:func:`run_personas`) with K >= 2 entries and ``gcfg.classes = personas``: a K-way gate, each record's
    persona the one listing its domain."""
    index = {d: i for i, p in enumerate(persona_list or ()) for d in p.get("domains", ())}
    # a domain of no listed persona (its persona won nowhere: :func:`routed_personas`) gives base rows
    kway = persona_list is not None and len(persona_list) >= 2 and gcfg.classes == "personas"
    return train_gate(
        features,
        [int(r["label"]) for r in records],
        gcfg,
        seed,
        groups=[r.get("domain", "") for r in records],
        targets=gate_targets(records, gcfg.target, gcfg.domain_prior),
        texts=[r["query"] for r in records],
        base_features=base_features,
        personas=[index.get(r.get("domain", ""), -1) for r in records] if kway else None,
        persona_list=persona_list if kway else None,
        everyday=everyday,
    )


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


KWAY_SETTINGS = {"classes": "binary", "temperature": "fit", "min_confidence": "auto"}
"""The K-way gate's settings (issue 29) at their defaults: a run's gate settings leave them out at these
values, so a run made before them resumes without a redo (its gate is binary with T = 1: the same routing
decisions as a fitted temperature gives, which only rescales the probabilities)."""


NEW_DEFAULTS = {"ood_contrast": "builtin"}
"""Gate settings added after runs were made, at their defaults: absent from a run's gate settings at these
values, so a run made before them resumes (a finished gate keeps the rule it was trained with; one
trained now gets the default)."""


def kway_classes(cfg: RunConfig) -> bool:
    """Whether ``gate.classes`` asks for one class (and one adapter) per persona (:func:`routed_personas`)."""
    return cfg.gate.classes == "personas"


def gate_settings(cfg: RunConfig) -> dict:
    """The settings the gate stage depends on (a rerun with others is refused)."""
    from dataclasses import asdict

    from ..bootstrap.verify import abstain_margin

    gate = asdict(cfg.gate)
    for key, old in {**KWAY_SETTINGS, **NEW_DEFAULTS}.items():  # absent at the value that trains
        if gate.get(key) == old:  # today's gate: old runs resume
            gate.pop(key)
    out = {"gate": gate, "model": cfg.model.model, "seed": cfg.seed}
    if abstain_margin(cfg) > 0:  # absent when off, so runs made before the option resume unchanged
        out["abstain_margin"] = abstain_margin(cfg)
    out.update(base_queries_settings(cfg))
    return out


def base_queries_settings(cfg: RunConfig) -> dict:
    """The base examples' content, for :func:`gate_settings` (an edited file or list is a change), and a
    ``gate.ood_contrast`` file's (absent at builtin and off, so runs made before the option resume)."""
    from ..config import is_queries_file

    out: dict = {}
    if str(cfg.gate.base_queries).strip().lower() != "off":
        out["base_queries_hash"] = base_queries_fingerprint(cfg.gate.base_queries)
    if is_queries_file(cfg.gate.ood_contrast):
        out["ood_contrast_hash"] = base_queries_fingerprint(cfg.gate.ood_contrast, "ood_contrast")
    return out


def check(cfg: RunConfig) -> None:
    """One-line errors for a base-queries or everyday-queries file before anything loads (the stage
    registry's check)."""
    from ..config import QUERIES_FILE_SETTINGS, is_queries_file

    for setting in QUERIES_FILE_SETTINGS:
        if is_queries_file(getattr(cfg.gate, setting)):
            read_base_queries(getattr(cfg.gate, setting), setting)


def step(ctx) -> None:
    """The stage registry's entry point: :func:`run_gate` on the run's labelled pairs."""
    run_gate(ctx.run, ctx.cfg, ctx.records, ctx.model, ctx.tokenizer)


def run_gate(run, cfg: RunConfig, records: Sequence[dict], model=None, tokenizer=None) -> dict:
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
    kept = gate_records(records)
    if len(kept) < len(records):
        log.info(
            "gate: %d of %d pairs are in the judge's abstain band and left out", len(records) - len(kept), len(records)
        )
    personas = routed_personas(run, cfg, records)  # on every pair, as distillation sees them: persona k = adapter k
    records = kept
    queries = [r["query"] for r in records]
    feats = query_features(model, tokenizer, queries, max(1, cfg.model.batch_size), cfg.gate.pooling)
    base = new_base_queries(base_queries(cfg.gate.base_queries), queries)
    base_feats = (
        query_features(model, tokenizer, base, max(1, cfg.model.batch_size), cfg.gate.pooling) if base else None
    )
    everyday = None
    if str(cfg.gate.ood_contrast).strip().lower() != "off" and cfg.gate.ood != "off":  # builtin or a file
        texts = new_base_queries(base_queries(cfg.gate.ood_contrast, "ood_contrast"), queries)
        everyday = (
            base_feats
            if texts == base and base_feats is not None
            else query_features(model, tokenizer, texts, max(1, cfg.model.batch_size), cfg.gate.pooling)
        )
    bundle = train_gate_on_records(feats, records, cfg.gate, cfg.seed, base_feats, personas, everyday)
    heldout = bundle.info.pop("heldout_indices", [])
    bundle.info["heldout_keys"] = [records[i].get("key") for i in heldout]
    bundle.save(run.path(GATE_DIR))
    png = plot_reliability(bundle.info.get("calibration", {}), run.path(GATE_DIR) / "reliability.png")
    m = bundle.info["metrics"]
    cal = bundle.info.get("calibration", {})
    info = {
        "threshold": bundle.threshold,
        "threshold_method": bundle.info["threshold_method"],
        "n_train": bundle.info["n_train"],
        "n_heldout": bundle.info["n_heldout"],
        "positives": bundle.info["positives"],
        "negatives": bundle.info["negatives"],
        "metrics": m,
        "routing_by_domain": bundle.info.get("routing_by_group", {}),
        "fallbacks": bundle.info["fallbacks"],
        "ood": bundle.info.get("ood_fit", {"method": "off"}),
        "base_examples": bundle.info.get("base_examples", 0),
        "calibration": {k: cal.get(k) for k in ("method", "temperature", "ece_before", "ece_after", "n", "note")},
        "reliability_plot": str(png) if png else None,
        **(
            {
                "personas": [p["name"] for p in bundle.info["personas"]],
                "min_confidence": bundle.gate.min_confidence,
                "confusion": bundle.info.get("confusion"),
            }
            if bundle.gate.personas > 1
            else {}
        ),
        "dir": str(run.path(GATE_DIR)),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    run.mark_done(STAGE, info)
    return info
