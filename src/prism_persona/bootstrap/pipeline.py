"""The bootstrap pipeline: personas -> queries -> answers -> verdicts -> summary.

:func:`run_bootstrap` runs (or resumes) every stage in ``cfg.out``. Each stage appends records as
chunks complete and skips records already present, so a run killed at any moment finishes on rerun
with every record exactly once. Before any work, every stage's saved settings are checked: a run
directory made with different data-affecting settings is refused with a one-line error. The model is
loaded only if some stage still has work to do.

:func:`load_labelled` is what the gate and distillation stages read.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Optional

from .. import config as C
from ..errors import PrismError
from ..store import JsonlStore, RunDir
from .answers import answers_store, write_answers
from .common import Lazy, counters, persona_file_hashes, stage_settings, token_stats
from .personas import load_personas, write_personas
from .queries import selected_queries, write_queries
from .summary import build_summary, format_summary
from .verify import verdicts_store, write_verdicts

log = logging.getLogger(__name__)


def check_run(cfg, run: RunDir) -> None:
    """Refuse early (before loading a model) if ``run`` holds records made with other settings."""
    for stage in ("personas", "queries", "query_rounds", "answers", "verdicts"):
        base = "queries" if stage == "query_rounds" else stage
        run.check_settings(stage, json.loads(json.dumps(stage_settings(cfg, base), default=str)))


def preflight(cfg, engine, judge) -> None:
    """One-line errors for a bad config, model, judge or persona file, before anything runs."""
    C.validate(cfg)
    if not cfg.persona.domains:
        raise PrismError('no domains given; use --domains "writing,coding,safety"')
    persona_file_hashes(cfg)  # raises for a missing or empty persona file
    if engine is None and cfg.engine.engine == "hf":
        from ..models import resolve_model

        resolve_model(cfg.model.model)
    if judge is None:
        from ..judges import check_judge_spec

        check_judge_spec(cfg.judge.judge)


def run_bootstrap(cfg, engine=None, judge=None) -> dict:
    """Run or resume the bootstrap in ``cfg.out``; write ``summary.json`` / ``summary.md``; return the summary.

    ``engine`` defaults to ``engines.make_engine(cfg)`` and ``judge`` to ``judges.make_judge(cfg, engine)``;
    both are built only when a stage needs them.
    """
    t0 = time.perf_counter()
    baseline = counters([engine] + (list(judge.engines) if judge is not None else []))
    preflight(cfg, engine, judge)
    run = RunDir(cfg.out)
    check_run(cfg, run)
    run.write_json("config.json", json.loads(C.dump(cfg)))

    def _make_engine():
        from ..engines import make_engine

        return make_engine(cfg)

    get_engine = Lazy(_make_engine, engine)

    def _make_judge():
        from ..judges import make_judge

        self_judge = (cfg.judge.judge or "self").strip().lower() == "self"
        return make_judge(cfg, get_engine() if self_judge else None)

    get_judge = Lazy(_make_judge, judge)
    try:
        persona_counts = write_personas(cfg, run, get_engine)
        personas = load_personas(run)
        collected = write_queries(cfg, run, get_engine, personas)
        queries = selected_queries(cfg, run)
        write_answers(cfg, run, get_engine, personas, queries)
        answers = _select(answers_store(run, cfg), queries)
        write_verdicts(cfg, run, get_judge, answers)
        verdicts = _select(verdicts_store(run, cfg), queries)
    finally:  # also on Ctrl-C: close what was built here and keep this invocation's token counts
        built = [get_engine.built] + (list(get_judge.built.engines) if get_judge.built is not None else [])
        tokens = record_tokens(run, token_stats(built, baseline), time.perf_counter() - t0)
        if judge is None and get_judge.built is not None:
            get_judge.built.close()
        if engine is None and get_engine.built is not None:
            get_engine.built.close()
    summary = build_summary(
        cfg.persona.domains, verdicts, answers, personas=persona_counts, queries=collected,
        target=cfg.queries.queries_per_persona, tokens=tokens,
        judge=getattr(get_judge.built, "name", cfg.judge.judge), mode=_judge_mode(get_judge.built, verdicts),
        model=cfg.model.model, wall_seconds=time.perf_counter() - t0, run=str(run.root))
    run.write_json("summary.json", summary)
    run.path("summary.md").write_text(format_summary(summary), encoding="utf-8")
    run.mark_done("bootstrap", {"pairs": len(verdicts), "labelled_positive": summary["total"]["wins"]})
    return summary


def record_tokens(run: RunDir, stats: dict, wall: float) -> dict:
    """Append this invocation's generation counters to ``bootstrap_sessions.jsonl`` (when it generated
    anything) and return ``{"this_invocation": ..., "total": ...}`` summed over all invocations."""
    ledger = JsonlStore(run.path("bootstrap_sessions.jsonl"))
    if stats["tokens_generated"] or stats["generate_seconds"]:
        ledger.append({"key": f"{time.time():.6f}-{os.getpid()}", "tokens_generated": stats["tokens_generated"],
                       "generate_seconds": stats["generate_seconds"], "wall_seconds": round(wall, 2)})
    toks = sum(r["tokens_generated"] for r in ledger)
    secs = sum(r["generate_seconds"] for r in ledger)
    total = {"tokens_generated": toks, "generate_seconds": round(secs, 3),
             "tokens_per_s": round(toks / secs, 2) if secs > 0 else None, "invocations": len(ledger)}
    return {"this_invocation": stats, "total": total}


def _judge_mode(judge, verdicts: list[dict]) -> Optional[str]:
    if judge is not None:
        return judge.mode
    modes = sorted({v["mode"] for v in verdicts})
    return ",".join(modes) or None


def _select(store: JsonlStore, queries: list[dict]) -> list[dict]:
    """The store's records for ``queries``, in query order (missing ones skipped)."""
    return [store.get(q["key"]) for q in queries if q["key"] in store]


def _open(run: RunDir, name: str) -> Optional[JsonlStore]:
    path = run.path(f"{name}.jsonl")
    return JsonlStore(path) if path.exists() else None


def load_labelled(run) -> list[dict]:
    """The labelled pairs of a bootstrap run, one dict per judged query.

    Keys: ``key, domain, query, persona, placement, base_answer, persona_answer, label`` (1 = the
    persona answer won both orders), plus ``winner``, ``persona_length`` and ``persona_finish`` (``length``
    when the answer was cut at the token budget). Only the domains and
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
        out.append({
            "key": v["key"], "domain": v["domain"], "query": v["query"],
            "persona": personas.get(v["domain"], {}).get(length, ""), "persona_length": length,
            "placement": a.get("placement") or pcfg.get("placement", "system"),
            "base_answer": a["base_answer"], "persona_answer": a["persona_answer"],
            "label": int(v["label"]), "winner": v["winner"],
            "persona_finish": a.get("persona_finish", "stop"),
        })
    return out
