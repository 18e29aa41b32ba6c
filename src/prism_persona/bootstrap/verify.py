"""Stage 4: self-verification -- the judge compares base and persona answer in both orders.

Order ``persona_first`` shows the persona answer as A, ``persona_second`` shows it as B. The persona
answer wins a query only if it wins both orders (label 1); everything else -- a loss, a tie, orders
that disagree ("mixed"), or a verdict that could not be read -- is label 0.

Records (``verdicts.jsonl``): ``key, domain, query, verdicts`` (one ``{order, winner, outcome,
detail}`` per order), ``winner`` (persona|base|tie|mixed|unparseable), ``label``, ``mode``, ``judge``,
``persona_chars, base_chars``.
"""

from __future__ import annotations

import logging
from typing import Callable

from ..judges import judge_swapped_batch
from ..progress import progress
from ..store import JsonlStore, RunDir
from .answers import chunk_size
from .common import chunks, stage_settings

log = logging.getLogger(__name__)

ORDERS = ("persona_first", "persona_second")
_WHO = {"x": "persona", "y": "base", "tie": "tie", "unparseable": "unparseable", "mixed": "mixed"}


def verdicts_store(run: RunDir, cfg) -> JsonlStore:
    return run.store("verdicts", depends_on=stage_settings(cfg, "verdicts"))


def verdict_record(ans: dict, result, judge) -> dict:
    """The record of one judged pair (x = persona answer, y = base answer)."""
    orders = []
    for order, verdict, outcome in zip(ORDERS, (result.first, result.second), result.outcomes):
        orders.append({"order": order, "winner": verdict.winner, "outcome": _WHO[outcome], "detail": verdict.detail})
    winner = _WHO[result.winner]
    return {"key": ans["key"], "domain": ans["domain"], "query": ans["query"], "verdicts": orders,
            "winner": winner, "label": int(winner == "persona"), "mode": judge.mode, "judge": judge.name,
            "persona_chars": len(ans["persona_answer"]), "base_chars": len(ans["base_answer"])}


def write_verdicts(cfg, run: RunDir, get_judge: Callable, answers: list[dict]) -> int:
    """Judge the answer pairs that have no verdict yet; return how many were judged now."""
    store = verdicts_store(run, cfg)
    todo = [a for a in answers if a["key"] not in store]
    if not todo:
        return 0
    judge = get_judge()
    bar = progress(total=len(todo), desc="verify", disable=cfg.quiet, unit="pair")
    for batch in chunks(todo, chunk_size(cfg)):
        results = judge_swapped_batch(judge, [(a["query"], a["persona_answer"], a["base_answer"]) for a in batch])
        store.extend(verdict_record(a, r, judge) for a, r in zip(batch, results))
        bar.update(len(batch))
    bar.close()
    return len(todo)
