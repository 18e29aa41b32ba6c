"""The gate's decision on each item a gated system answered, as ``per_item.json`` keeps it, and how Table 1,
Figure 4 and the threshold sweep read it.

``per_item["gate"][system][member][item_id]`` is a **record** of the decision on the item's first user turn::

    {"gate_prob": 0.83, "routed": false, "abstained": true, "outside": true,
     "persona": null, "persona_prob": null}

* ``gate_prob``: the gate's routing probability (K-way: the most probable persona against base,
  ``P(k*) / (P(k*) + P(base))``);
* ``routed``: the decision the answer was made with (the adapter ran);
* ``abstained`` (a gate that can abstain: an abstain region, ``gate.ood``, or a K-way persona-confidence
  floor): the probability said route (``gate_prob >= threshold``) but the query went to the base model;
* ``outside`` (same gates): the query lies outside the gate's region (or, K-way, no persona reaches the
  floor) -- independent of the threshold, so the sweep knows the query stays unrouted at every threshold;
* ``persona`` / ``persona_prob`` (a K-way artifact): the routed persona's name and probability (``None``
  where the query went to the base model).

The record is the routing meta of the completion itself (:func:`record`): the gated model's prefill
hook (or, for a chat that is not a lone user turn, the decision on its first user turn) reports
``abstained`` and ``outside`` of the one decision it routed by (``Decision.outside``), so nothing here
asks the gate a second time; scored prompts (nothing generated) get the same fields from one
``decisions`` call (:func:`decision_meta`).

A **bare float** (``per_item.json`` written before the record existed, or a hand-made file) is the
probability alone; it is read with the rule of that time: routed at threshold ``t`` when ``p >= t``
(which overstates the routing of a gate that abstains).

Read rules: :func:`decided` (Table 1, Figure 4, routing.png: the actual decision), :func:`routed_at`
(the sweep: the decision at another threshold ``t``: ``p >= t`` and the query not outside the region;
a record without ``outside`` counts the query outside when it abstained and inside otherwise, which is
exact for thresholds at or above the artifact's and for a gate without a region).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

Record = Union[float, dict]

RECORD_KEYS = ("gate_prob", "routed", "abstained", "outside", "persona", "persona_prob")
"""The keys of a completion's routing meta an eval keeps (response cache and ``per_item.json``)."""


def record(meta: Any) -> Optional[dict]:
    """The gate record of one completion's routing meta (``None`` when the meta has no gate probability)."""
    if not isinstance(meta, dict) or meta.get("gate_prob") is None:
        return None
    out: dict = {"gate_prob": float(meta["gate_prob"]), "routed": bool(meta.get("routed", False))}
    for k in ("abstained", "outside"):
        if k in meta and meta[k] is not None:
            out[k] = bool(meta[k])
    if meta.get("persona") is not None:
        out["persona"] = str(meta["persona"])
        if meta.get("persona_prob") is not None:
            out["persona_prob"] = float(meta["persona_prob"])
    return out


def prob(rec: Record) -> float:
    """The gate probability of a record (or of a bare float)."""
    return float(rec["gate_prob"]) if isinstance(rec, dict) else float(rec)


def decided(rec: Record, threshold: Optional[float] = None) -> bool:
    """Whether the item was routed: the recorded decision; a bare float: ``p >= threshold`` (0.5 if None)."""
    if isinstance(rec, dict):
        return bool(rec.get("routed", False))
    return float(rec) >= (0.5 if threshold is None else threshold)


def outside(rec: Record) -> bool:
    """Whether the query lies outside the gate's region (stays unrouted at every threshold): the recorded
    ``outside``; else ``abstained`` (it said route and went to the base model); else False."""
    if not isinstance(rec, dict):
        return False
    if "outside" in rec:
        return bool(rec["outside"])
    return bool(rec.get("abstained", False))


def routed_at(rec: Record, threshold: float) -> bool:
    """The decision at ``threshold`` (the sweep): ``p >= threshold`` and the query not :func:`outside`."""
    return prob(rec) >= threshold and not outside(rec)


def abstained(rec: Record) -> Optional[bool]:
    """Whether the gate abstained (``None``: the record cannot say: a bare float, or a gate without a region)."""
    if isinstance(rec, dict) and "abstained" in rec:
        return bool(rec["abstained"])
    return None


def persona(rec: Record) -> Optional[str]:
    """The persona the item was routed to (``None``: base model, or an artifact whose adapter has no name)."""
    if isinstance(rec, dict) and rec.get("routed"):
        return rec.get("persona")
    return None


def personas(records: Sequence[Record], known: Sequence[Optional[str]] = ()) -> list[str]:
    """The persona names of a K-way artifact: ``known`` (the artifact's, in its order) then any other name
    the records hold; empty unless there are at least two (a binary artifact has no per-persona rows)."""
    names = [n for n in known if n]
    for r in records:
        p = persona(r)
        if p and p not in names:
            names.append(p)
    return names if len(names) >= 2 else []


# ------------------------------------------------------------------------------------------ engines


def gated_model(engine) -> Any:
    """The :class:`~prism_persona.gated.model.GatedModel` behind a gated engine (the in-process
    ``GatedEngine``'s ``gated``, the vLLM ``RoutedEngine``'s ``router``), or ``None``."""
    for name in ("gated", "router"):
        gm = getattr(engine, name, None)
        if gm is not None and callable(getattr(gm, "decisions", None)):
            return gm
    return None


def scored_with_meta(engine, chats: Sequence[list], choices: Sequence[str]) -> tuple[Optional[list], list[dict]]:
    """``(engine.score_choices(chats, choices), routing meta per chat)`` of a gated engine: the meta of the
    decision the scoring forward itself routed by where the engine reports it (``score_choices_meta``:
    the in-process gated model's prefill hook, the vLLM router's plan), else :func:`decision_meta`.
    Scores ``None``: the engine cannot score (meta ``{}`` per chat)."""
    fn = getattr(engine, "score_choices_meta", None)
    if callable(fn):
        scores, metas = fn(list(chats), list(choices))
        return scores, [{k: m[k] for k in RECORD_KEYS if k in m} for m in metas]
    scores = engine.score_choices(chats, list(choices))
    return scores, (decision_meta(engine, chats) if scores is not None else [{} for _ in chats])


def decision_meta(engine, chats: Sequence[list]) -> list[dict]:
    """The routing meta of scored prompts (MMLU by log-likelihood: nothing is generated) as a completion of
    the gated engine reports it (``outside`` included where the gate can abstain): one decision per chat,
    from its first user turn (``decisions``); ``[{}...]`` for an engine without a gate."""
    gm = gated_model(engine)
    if gm is not None:
        out = []
        for d in gm.decisions(list(chats)):
            m: dict = {"gate_prob": float(d["gate_prob"]), "routed": bool(d["routed"])}
            if getattr(gm, "has_abstain", False):
                m["abstained"] = bool(d["abstained"])
                if "outside" in d:
                    m["outside"] = bool(d["outside"])
            if d.get("persona_name") is not None:
                m["persona"], m["persona_prob"] = d["persona_name"], d.get("persona_prob")
            out.append(m)
        return out
    fn = getattr(engine, "route", None)
    if not callable(fn):
        return [{} for _ in chats]
    return [{"gate_prob": float(p), "routed": bool(r)} for p, r in fn(chats)]
