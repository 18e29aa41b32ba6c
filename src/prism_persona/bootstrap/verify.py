"""Stage 4: self-verification -- the judge compares base and persona answer in both orders.

Order ``persona_first`` shows the persona answer as A, ``persona_second`` shows it as B. The persona
answer wins a query only if it wins both orders (label 1); everything else -- a loss, a tie, orders
that disagree ("mixed"), or a verdict that could not be read -- is label 0.

:func:`load_labelled` joins answers and verdicts into the labelled pairs the gate and distillation read.

Records (``verdicts.jsonl``): ``key, domain, query, verdicts`` (one ``{order, winner, outcome,
detail}`` per order), ``winner`` (persona|base|tie|mixed|unparseable), ``label``, ``mode``, ``judge``,
``persona_chars, base_chars``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Optional

from ..config import RunConfig
from ..errors import PrismError
from ..judges import judge_swapped_batch
from ..progress import progress
from ..store import JsonlStore, RunDir
from .answers import chunk_size
from .common import chunks, stage_settings
from .personas import load_personas
from .summary import BLIND_MIN_PAIRS, blind_warning, judge_diagnostics, persona_margin

log = logging.getLogger(__name__)

ORDERS = ("persona_first", "persona_second")
_WHO = {"x": "persona", "y": "base", "tie": "tie", "unparseable": "unparseable", "mixed": "mixed"}


def verdicts_store(run: RunDir, cfg: RunConfig) -> JsonlStore:
    return run.store("verdicts", depends_on=stage_settings(cfg, "verdicts"))


def verdict_record(ans: dict, result, judge) -> dict:
    """The record of one judged pair (x = persona answer, y = base answer)."""
    orders = []
    for order, verdict, outcome in zip(ORDERS, (result.first, result.second), result.outcomes):
        orders.append({"order": order, "winner": verdict.winner, "outcome": _WHO[outcome], "detail": verdict.detail})
    winner = _WHO[result.winner]
    return {
        "key": ans["key"],
        "domain": ans["domain"],
        "query": ans["query"],
        "verdicts": orders,
        "winner": winner,
        "label": int(winner == "persona"),
        "mode": judge.mode,
        "judge": judge.name,
        "persona_chars": len(ans["persona_answer"]),
        "base_chars": len(ans["base_answer"]),
    }


def persona_text(personas: dict, answer: dict, cfg: RunConfig) -> str:
    """The persona the answer was written with (what a context-aware judge receives)."""
    length = answer.get("persona_length") or cfg.persona.use_length
    return personas.get(answer["domain"], {}).get(length, "")


def write_verdicts(
    cfg: RunConfig, run: RunDir, get_judge: Callable, answers: list[dict], personas: Optional[dict] = None
) -> int:
    """Judge the answer pairs that have no verdict yet; return how many were judged now. A judge
    receives each pair's domain and persona text too (``personas`` = ``{domain: {length: text}}``)."""
    personas = personas if personas is not None else load_personas(run)
    store = verdicts_store(run, cfg)
    todo = [a for a in answers if a["key"] not in store]
    if not todo:
        return 0
    judge = get_judge()
    bar = progress(total=len(todo), desc="verify", disable=cfg.quiet, unit="pair")
    checked = False
    for batch in chunks(todo, chunk_size(cfg, getattr(judge, "engine", None))):  # a server judge gets full calls
        results = judge_swapped_batch(
            judge,
            [
                (a["query"], a["persona_answer"], a["base_answer"], a["domain"], persona_text(personas, a, cfg))
                for a in batch
            ],
        )
        store.extend(verdict_record(a, r, judge) for a, r in zip(batch, results))
        bar.update(len(batch))
        checked = checked or warn_if_blind([store.get(a["key"]) for a in answers if a["key"] in store], judge.name)
    bar.close()
    return len(todo)


def warn_if_blind(verdicts: list[dict], judge_name: str) -> bool:
    """After a verification batch: warn in one line when the verdicts so far show a blind judge
    (:data:`~prism_persona.bootstrap.summary.BLIND_RULE`). True once the check could be made."""
    diag = judge_diagnostics(verdicts)
    if diag["pairs"] < BLIND_MIN_PAIRS:
        return False
    if diag["blind"]:
        log.warning("verify: %s", blind_warning(diag["blind"], f"the judge '{judge_name}'"))
    return True


def _open(run: RunDir, name: str) -> Optional[JsonlStore]:
    path = run.path(f"{name}.jsonl")
    return JsonlStore(path) if path.exists() else None


def load_labelled(run, abstain_margin: Optional[float] = None) -> list[dict]:
    """The labelled pairs of a bootstrap run, one dict per judged query.

    Keys: ``key, domain, query, persona, placement, base_answer, persona_answer, label`` (1 = the
    persona answer won both orders), plus ``winner``, ``persona_length`` and ``persona_finish`` (``length``
    when the answer was cut at the token budget), ``margin`` (:func:`persona_margin`) and ``abstain``
    (True when ``|margin|`` is below ``abstain_margin``, default: the run's ``judge.abstain_margin``:
    the judge barely preferred either answer, so the pair is no win and the gate leaves it out).
    Only the domains and
    the first ``queries_per_persona`` queries per domain of the run's saved config are returned.
    """
    run = run if isinstance(run, RunDir) else RunDir(run)
    verdicts, answers = _open(run, "verdicts"), _open(run, "answers")
    if verdicts is None or answers is None:
        raise PrismError(f"{run.root} has no bootstrap verdicts; run `prism bootstrap --out {run.root}` first")
    if not run.done("bootstrap"):
        log.warning("%s: the bootstrap has not finished; using the %d pairs judged so far", run.root, len(verdicts))
    saved = run.read_json("config.json") or {}
    pcfg = saved.get("persona", {})
    domains = pcfg.get("domains")
    limit = saved.get("queries", {}).get("queries_per_persona")
    if abstain_margin is None:
        abstain_margin = float(saved.get("judge", {}).get("abstain_margin", 0.0) or 0.0)
    queries = _open(run, "queries")
    keys = None
    if queries is not None and domains and limit:
        keys = set()
        for d in domains:
            keys.update(r["key"] for r in [q for q in queries if q["domain"] == d][:limit])
    personas = load_personas(run)
    out = []
    for v in verdicts:
        a = answers.get(v["key"])
        if a is None or (domains and v["domain"] not in domains) or (keys is not None and v["key"] not in keys):
            continue
        length = a.get("persona_length") or pcfg.get("use_length", "short")
        margin = persona_margin(v["verdicts"])
        abstain = margin is not None and abs(margin) < abstain_margin
        out.append(
            {
                "key": v["key"],
                "domain": v["domain"],
                "query": v["query"],
                "persona": personas.get(v["domain"], {}).get(length, ""),
                "persona_length": length,
                "placement": a.get("placement") or pcfg.get("placement", "system"),
                "base_answer": a["base_answer"],
                "persona_answer": a["persona_answer"],
                "label": 0 if abstain else int(v["label"]),
                "winner": v["winner"],
                "margin": margin,
                "abstain": abstain,
                "persona_finish": a.get("persona_finish", "stop"),
            }
        )
    return out
