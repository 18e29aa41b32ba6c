"""Stage 4: self-verification -- the judge compares base and persona answer in both orders.

Order ``persona_first`` shows the persona answer as A, ``persona_second`` shows it as B. The persona
answer wins a query only if it wins both orders (label 1); everything else -- a loss, a tie, orders
that disagree ("mixed"), or a verdict that could not be read -- is label 0.

:func:`load_labelled` joins answers and verdicts into the labelled pairs the gate and distillation read.

Records (``verdicts.jsonl``): ``key, domain, query, verdicts`` (one ``{order, winner, outcome,
detail}`` per order), ``winner`` (persona|base|tie|mixed|unparseable), ``label``, ``mode``, ``judge``,
``persona_chars, base_chars``, ``rule`` (what decided the pair) and, for the margin rule, ``margin`` and
``band``; records of answer samples s >= 1 (``answers.samples`` > 1) add ``query_key`` and ``sample``.

Two rules decide a pair (``judge.rule``):

* ``both_orders`` (the paper's): the persona wins only if it wins both orders. A judge that always
  names one position produces no wins at all -- and no signal either.
* ``margin`` (log-prob judges): the persona's margin averaged over both orders
  (:func:`~prism_persona.bootstrap.summary.persona_margin`, in which a fixed position prior cancels)
  decides: above the abstain band a persona win, below minus the band a base win, else a tie (the
  pair abstains: no label for the gate). The band is calibrated on the run itself
  (:func:`calibrate_band`: ``judge.null_pairs`` pairs of two base answers to the same query, whose true
  difference is zero; the band is the ``judge.null_quantile`` quantile of their ``|margin|``), or is
  ``judge.abstain_margin`` as given when ``null_pairs`` = 0. Text and rule judges have no margins and
  keep ``both_orders`` (said once in the log).

Null pairs are stored in ``null_pairs.jsonl`` (``key`` = the query's, ``null_answer``, ``verdicts``,
``margin``), so a resumed run reuses them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Optional

from ..config import RunConfig
from ..errors import PrismError
from ..judges import judge_swapped_batch
from ..models import user_chat
from ..progress import progress
from ..stats import _quantile
from ..store import JsonlStore, RunDir
from .answers import answers_settings, chunk_size, query_key_of, samples, sampling, select
from .common import chunks, derive_seed, stage_settings
from .personas import load_personas, shown
from .summary import BLIND_MIN_PAIRS, blind_warning, debiased_note, judge_diagnostics, persona_margin

log = logging.getLogger(__name__)

ORDERS = ("persona_first", "persona_second")
_WHO = {"x": "persona", "y": "base", "tie": "tie", "unparseable": "unparseable", "mixed": "mixed"}


def verdicts_settings(cfg: RunConfig) -> dict:
    """What the verdict records depend on: the answers' settings and the judge's."""
    j = cfg.judge
    s = answers_settings(cfg)
    s["judge"] = {"judge": j.judge, "mode": j.mode, "max_new_tokens": j.max_new_tokens, "tie_margin": j.tie_margin}
    if j.rule != "both_orders":  # absent for the paper's rule, so runs made before the option resume unchanged
        s["judge"].update(rule=j.rule, null_pairs=j.null_pairs, null_quantile=j.null_quantile)
        if not j.null_pairs:
            s["judge"]["abstain_margin"] = j.abstain_margin  # the band decides the verdicts
    return s


# What the pipeline, the training stages and the summary read of the judge's settings.


def judge_spec(cfg: RunConfig) -> str:
    """The ``--judge`` value (``self``, a model, a built-in rule judge or ``module:function``)."""
    return cfg.judge.judge


def abstain_margin(cfg: RunConfig) -> float:
    """The judge's abstain band (0 = off): pairs inside it are left out of the gate's training."""
    return cfg.judge.abstain_margin


def check_judge(cfg: RunConfig) -> None:
    """A judge that cannot load is one line, before any model loads (a ``module:function`` judge is
    resolved, not called)."""
    from ..judges import check_judge_spec

    check_judge_spec(cfg.judge.judge)


def build_judge(cfg: RunConfig, get_engine: Callable):
    """The run's judge; the ``self`` judge shares the answering engine (``get_engine()``)."""
    from ..judges import make_judge

    return make_judge(cfg, get_engine() if cfg.judge.is_self() else None)


def step(ctx) -> None:
    """Judge the answer pairs that have no verdict yet; publish the selected ``verdicts``, the
    ``judge`` spec and the ``abstain_margin`` (for the summary)."""
    queries = ctx.outputs["queries"]
    write_verdicts(ctx.cfg, ctx.run, ctx.judge, ctx.outputs["answers"], ctx.outputs["personas"], ctx.engine)
    ctx.outputs["verdicts"] = select(verdicts_store(ctx.run, ctx.cfg), queries, samples(ctx.cfg))
    ctx.outputs["judge"] = ctx.options.judge
    ctx.outputs["abstain_margin"] = ctx.options.abstain_margin


def verdicts_store(run: RunDir, cfg: RunConfig) -> JsonlStore:
    return run.store("verdicts", depends_on=stage_settings(cfg, "verdicts"))


def verdict_record(ans: dict, result, judge, rule: str = "both_orders", band: float = 0.0) -> dict:
    """The record of one judged pair (x = persona answer, y = base answer), decided by ``rule``
    (``margin``: :func:`margin_winner` with ``band``)."""
    orders = []
    for order, verdict, outcome in zip(ORDERS, (result.first, result.second), result.outcomes):
        orders.append({"order": order, "winner": verdict.winner, "outcome": _WHO[outcome], "detail": verdict.detail})
    rec = {
        "key": ans["key"],
        "domain": ans["domain"],
        "query": ans["query"],
        "verdicts": orders,
    }
    if rule == "margin":
        margin = persona_margin(orders)
        winner = margin_winner(margin, band)
        extra = {"rule": "margin", "band": round(float(band), 4), "margin": margin}
    else:
        winner, extra = _WHO[result.winner], {"rule": "both_orders"}
    rec.update(
        winner=winner,
        label=int(winner == "persona"),
        mode=judge.mode,
        judge=judge.name,
        persona_chars=len(ans["persona_answer"]),
        base_chars=len(ans["base_answer"]),
        **extra,
    )
    if "query_key" in ans:
        rec.update(query_key=ans["query_key"], sample=ans["sample"])
    return rec


def margin_winner(margin: Optional[float], band: float) -> str:
    """The margin rule: ``persona`` above ``band``, ``base`` below ``-band``, else ``tie``;
    ``unparseable`` without a margin."""
    if margin is None:
        return "unparseable"
    if margin > band:
        return "persona"
    if margin < -band:
        return "base"
    return "tie"


def effective_rule(rule: str, judge) -> str:
    """``rule`` (``judge.rule``), or ``both_orders`` (said once) when the judge gives no log-probabilities."""
    if rule == "margin" and judge.mode != "logprob":
        log.info(
            "verify: judge.rule=margin needs log-probabilities; the %s judge '%s' gives none, so the "
            "both-orders rule decides",
            judge.mode,
            judge.name,
        )
        return "both_orders"
    return rule


def null_store(run: RunDir, cfg: RunConfig) -> JsonlStore:
    return run.store("null_pairs", depends_on=stage_settings(cfg, "verdicts"))


def calibrate_band(
    cfg: RunConfig, run: RunDir, get_engine: Optional[Callable], judge, answers: list[dict]
) -> tuple[float, int]:
    """The margin rule's abstain band and the number of null pairs it came from.

    A null pair is a second base answer to one of the first ``judge.null_pairs`` queries (sampled like
    the answers, its seed derived from the query key), judged in both orders against the stored base
    answer: two samples of the same system, so any margin is the judge's noise. The band is the
    ``judge.null_quantile`` quantile of ``|margin|`` over them. ``null_pairs`` = 0: ``abstain_margin``."""
    jc = cfg.judge
    if jc.null_pairs <= 0:
        return float(jc.abstain_margin), 0
    picked = [x for x in answers if "query_key" not in x][: jc.null_pairs]
    store = null_store(run, cfg)
    todo = [x for x in picked if x["key"] not in store]
    if todo:
        engine = get_engine() if get_engine is not None else judge.engine
        for batch in chunks(todo, chunk_size(cfg.model.batch_size, engine) * 2):
            params = sampling(cfg, derive_seed(cfg.seed, "null", batch[0]["key"]))
            outs = engine.generate([user_chat(x["query"]) for x in batch], params)
            results = judge_swapped_batch(
                judge, [(x["query"], o.text, x["base_answer"], x["domain"], "") for x, o in zip(batch, outs)]
            )
            recs = []
            for x, o, r in zip(batch, outs, results):
                rec = verdict_record(
                    {
                        "key": x["key"],
                        "domain": x["domain"],
                        "query": x["query"],
                        "persona_answer": o.text,
                        "base_answer": x["base_answer"],
                    },
                    r,
                    judge,
                    "margin",
                )
                recs.append(
                    {"key": x["key"], "null_answer": o.text, "verdicts": rec["verdicts"], "margin": rec["margin"]}
                )
            store.extend(recs)
    margins = sorted(abs(store.get(x["key"])["margin"]) for x in picked if store.get(x["key"])["margin"] is not None)
    if not margins:
        log.warning("verify: no null pair gave a margin; the abstain band is judge.abstain_margin")
        return float(jc.abstain_margin), 0
    return float(_quantile(margins, jc.null_quantile)), len(margins)


def persona_text(personas: dict, answer: dict, use_length: str) -> str:
    """The persona the answer was written with (what a context-aware judge receives; ``use_length``
    for records that do not say)."""
    length = answer.get("persona_length") or use_length
    return personas.get(answer["domain"], {}).get(length, "")


def write_verdicts(
    cfg: RunConfig,
    run: RunDir,
    get_judge: Callable,
    answers: list[dict],
    personas: Optional[dict] = None,
    get_engine: Optional[Callable] = None,
) -> int:
    """Judge the answer pairs that have no verdict yet; return how many were judged now. A judge
    receives each pair's domain and persona text too (``personas`` = ``{domain: {length: text}}``).
    ``get_engine``: the answering engine, for the margin rule's null pairs (default: the judge's)."""
    personas = personas if personas is not None else load_personas(run)
    store = verdicts_store(run, cfg)
    todo = [a for a in answers if a["key"] not in store]
    if not todo:
        return 0
    judge = get_judge()
    rule, band = effective_rule(cfg.judge.rule, judge), 0.0
    if rule == "margin":
        band, n_null = calibrate_band(cfg, run, get_engine, judge, answers)
        how = (
            f"the {cfg.judge.null_quantile:.0%} quantile of |margin| over {n_null} null pairs"
            if n_null
            else "judge.abstain_margin"
        )
        log.info("verify: margin rule, abstain band %.3f (%s)", band, how)
    bar = progress(total=len(todo), desc="verify", disable=cfg.quiet, unit="pair")
    checked, use_length = False, shown(cfg)[0]
    size = chunk_size(cfg.model.batch_size, getattr(judge, "engine", None))  # a server judge gets full calls
    for batch in chunks(todo, size):
        results = judge_swapped_batch(
            judge,
            [
                (a["query"], a["persona_answer"], a["base_answer"], a["domain"], persona_text(personas, a, use_length))
                for a in batch
            ],
        )
        store.extend(verdict_record(a, r, judge, rule, band) for a, r in zip(batch, results))
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
        log.warning("verify: %s", blind_warning(diag["blind"], f"the judge '{judge_name}'", debiased_note(verdicts)))
    return True


def _open(run: RunDir, name: str) -> Optional[JsonlStore]:
    path = run.path(f"{name}.jsonl")
    return JsonlStore(path) if path.exists() else None


def load_labelled(run, abstain_margin: Optional[float] = None) -> list[dict]:
    """The labelled pairs of a bootstrap run, one dict per judged query.

    Keys: ``key, domain, query, persona, placement, base_answer, persona_answer, label`` (1 = the
    persona answer won), plus ``winner``, ``persona_length`` and ``persona_finish`` (``length``
    when the answer was cut at the token budget), ``margin`` (:func:`persona_margin`) and ``abstain``
    (True when the judge barely preferred either answer, so the pair is no win and the gate leaves
    it out: for the ``both_orders`` rule ``|margin|`` below ``abstain_margin``, default the run's
    ``judge.abstain_margin``; for the ``margin`` rule a tie inside the band its record names).

    A query answered several times (the run's ``answers.samples`` = k > 1) is one dict whose
    ``samples`` lists each judged sample pair (``key, sample, persona_answer, base_answer,
    persona_finish, label, winner, margin, abstain``); ``win_share`` = the share of persona wins over
    the samples outside the abstain band, ``label`` = 1 when that share is at least 0.5, ``abstain``
    when every sample abstained, ``margin`` the mean margin; ``persona_answer`` / ``base_answer`` are
    sample 0's. Only the domains and the first ``queries_per_persona`` queries per domain of the
    run's saved config are returned, with at most its ``answers.samples`` samples each.
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
    samples = int(saved.get("answers", {}).get("samples", 1) or 1)
    if abstain_margin is None:
        abstain_margin = float(saved.get("judge", {}).get("abstain_margin", 0.0) or 0.0)
    queries = _open(run, "queries")
    keys = None
    if queries is not None and domains and limit:
        keys = set()
        for d in domains:
            keys.update(r["key"] for r in [q for q in queries if q["domain"] == d][:limit])
    personas = load_personas(run)
    grouped: dict = {}
    for v in verdicts:
        a = answers.get(v["key"])
        qkey = query_key_of(v)
        if a is None or (domains and v["domain"] not in domains) or (keys is not None and qkey not in keys):
            continue
        if int(v.get("sample", 0)) >= samples:
            continue
        margin = persona_margin(v["verdicts"])
        if v.get("rule") == "margin":
            abstain = v["winner"] == "tie"
        else:
            abstain = margin is not None and abs(margin) < abstain_margin
        pair = {
            "key": v["key"],
            "sample": int(v.get("sample", 0)),
            "base_answer": a["base_answer"],
            "persona_answer": a["persona_answer"],
            "persona_finish": a.get("persona_finish", "stop"),
            "label": 0 if abstain else int(v["label"]),
            "winner": v["winner"],
            "margin": margin,
            "abstain": abstain,
        }
        grouped.setdefault(qkey, []).append((v, a, pair))
    out = []
    for qkey, rows in grouped.items():
        rows.sort(key=lambda t: t[2]["sample"])
        v, a, first = rows[0]
        length = a.get("persona_length") or pcfg.get("use_length", "short")
        rec = {
            "key": qkey,
            "domain": v["domain"],
            "query": v["query"],
            "persona": personas.get(v["domain"], {}).get(length, ""),
            "persona_length": length,
            "placement": a.get("placement") or pcfg.get("placement", "system"),
            "base_answer": first["base_answer"],
            "persona_answer": first["persona_answer"],
            "label": first["label"],
            "winner": first["winner"],
            "margin": first["margin"],
            "abstain": first["abstain"],
            "persona_finish": first["persona_finish"],
        }
        if samples > 1:
            pairs = [p for _, _, p in rows]
            counted = [p for p in pairs if not p["abstain"]]
            share = sum(p["label"] for p in counted) / len(counted) if counted else 0.0
            margins = [p["margin"] for p in pairs if p["margin"] is not None]
            rec.update(
                samples=pairs,
                win_share=round(share, 4),
                label=int(bool(counted) and share >= 0.5),
                abstain=not counted,
                margin=round(sum(margins) / len(margins), 4) if margins else None,
                winner="persona" if counted and share >= 0.5 else "base" if counted and share == 0 else "mixed",
            )
        out.append(rec)
    return out
