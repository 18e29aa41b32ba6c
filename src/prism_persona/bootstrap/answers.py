"""Stage 3: every query answered twice -- as the plain model and with its domain's persona.

The base answer is generated from the bare chat ``[user: query]`` (the chat template's own default
system prompt, if any, is left as it is); the persona answer from the same chat carrying the persona
(``use_length`` variant) in the configured placement. Both come from one seeded generate call per
chunk of queries (a few engine batches streamed through one cache, :data:`STREAM_BATCHES`; for a
server engine its requests in flight), so a kill loses at most one chunk.

Records (``answers.jsonl``): ``key`` (the query's key), ``domain, query, persona_length, placement,
base_answer, persona_answer, base_tokens, persona_tokens, base_finish, persona_finish``.

With ``answers.samples`` = k > 1 every query is answered k times with and k times without the persona.
Sample 0 is the record above (same key, same seed: a run made with k = 1 is its first sample); sample
s >= 1 has the key :func:`sample_key` and adds ``query_key`` and ``sample``. Samples are generated
sample by sample (all queries' sample 0, then sample 1, ...), each chunk with its own seed derived from
its first record's key, so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..config import RunConfig
from ..engines.base import SamplingParams
from ..errors import PrismError
from ..models import user_chat, with_persona
from ..progress import progress
from ..store import JsonlStore, RunDir
from .common import chunks, derive_seed, stage_settings
from .personas import shown
from .queries import queries_settings

log = logging.getLogger(__name__)


def answers_settings(cfg: RunConfig) -> dict:
    """What the answer records depend on: the queries' settings and the answers' sampling."""
    a = cfg.answers
    s = queries_settings(cfg)
    s["answers"] = {"max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "top_p": a.top_p}
    return s


def answers_store(run: RunDir, cfg: RunConfig) -> JsonlStore:
    return run.store("answers", depends_on=stage_settings(cfg, "answers"))


def sampling(cfg: RunConfig, seed: int) -> SamplingParams:
    """How an answer is sampled (also the margin rule's null answers), with ``seed``."""
    a = cfg.answers
    return SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, seed=seed)


def check(cfg: RunConfig) -> None:
    """One-line error before anything runs: k > 1 greedy samples would be k identical answers per query
    (the labels and the distillation set copied k times, not k draws)."""
    a = cfg.answers
    if a.samples > 1 and a.temperature == 0:
        raise PrismError(
            f"answers.samples = {a.samples} with answers.temperature = 0 (greedy) gives {a.samples} identical answers "
            "per query: set answers.temperature above 0 (e.g. 0.7) or answers.samples = 1"
        )


def samples(cfg: RunConfig) -> int:
    """Answer samples per query (records are keyed per sample: more samples extend a run)."""
    return cfg.answers.samples


def select(store: JsonlStore, queries: list[dict], samples: int = 1) -> list[dict]:
    """The store's records for ``queries`` (``samples`` answer samples each), sample by sample in query
    order (missing ones skipped)."""
    return [store.get(k) for k in sample_keys(queries, samples) if k in store]


def step(ctx) -> None:
    """Answer the missing (query, sample) pairs; publish the selected ``answers``."""
    queries = ctx.outputs["queries"]
    write_answers(ctx.cfg, ctx.run, ctx.engine, ctx.outputs["personas"], queries)
    ctx.outputs["answers"] = select(answers_store(ctx.run, ctx.cfg), queries, ctx.options.samples)


def answer_chats(query: str, persona: str, placement: str) -> tuple[list, list]:
    """(base chat, persona chat) for one query."""
    base = user_chat(query)
    return base, with_persona(base, persona, placement)


STREAM_BATCHES = 4
"""In-process engine calls carry this many engine batches (``model.batch_size`` rows each): the engine
streams a call's rows through one cache, refilling the slots of finished rows with waiting ones, so
the decode batch stays full until the call's last rows; a call of one batch drains instead (its rows
stop one by one and the batch shrinks). Four batches per call keep that drain to the end of every
fourth batch while a kill still loses at most one call."""


def chunk_size(batch_size: int, engine=None) -> int:
    """Queries per chunk: both answers of a chunk fill one engine call -- :data:`STREAM_BATCHES` batches
    of an engine that refills finished rows' slots (``engine.refills_rows``: the in-process engine;
    queries of every domain, with and without the persona, in one stream), one batch of any other
    in-process engine, or a server engine's ``preferred_call_size`` (its requests in flight: 64 for
    vLLM), so vLLM's continuous batching is not drained at the end of each small call."""
    streams = STREAM_BATCHES if getattr(engine, "refills_rows", False) else 1
    rows = int(getattr(engine, "preferred_call_size", 0) or 0) or streams * batch_size
    return max(1, rows // 2)


def sample_key(query_key: str, sample: int) -> str:
    """The record key of answer sample ``sample`` of a query (sample 0 keeps the query's key)."""
    return query_key if sample == 0 else f"{query_key}~s{sample}"


def query_key_of(record: dict) -> str:
    """The query key an answer / verdict record belongs to."""
    return record.get("query_key") or record["key"]


def sample_keys(queries: list[dict], samples: int) -> list[str]:
    """The answer record keys of ``queries`` with ``samples`` samples each, sample by sample."""
    return [sample_key(q["key"], s) for s in range(max(1, samples)) for q in queries]


def write_answers(cfg: RunConfig, run: RunDir, get_engine: Callable, personas: dict, queries: list[dict]) -> int:
    """Answer the (query, sample) pairs that have no record yet; return how many were answered now."""
    store = answers_store(run, cfg)
    use_length, placement = shown(cfg)
    todo = [(q, s) for s in range(max(1, samples(cfg))) for q in queries if sample_key(q["key"], s) not in store]
    if not todo:
        return 0
    engine = get_engine()
    bar = progress(total=len(todo), desc="answers", disable=cfg.quiet, unit="pair")
    for s in sorted({s for _, s in todo}):  # one sample index per chunk: its seed differs from the others'
        for batch in chunks([q for q, si in todo if si == s], chunk_size(cfg.model.batch_size, engine)):
            chats = []
            for q in batch:
                base, with_p = answer_chats(q["query"], personas[q["domain"]][use_length], placement)
                chats.extend([base, with_p])
            params = sampling(cfg, derive_seed(cfg.seed, "answers", sample_key(batch[0]["key"], s)))
            outs = engine.generate(chats, params)
            recs = []
            for i, q in enumerate(batch):
                base_out, pers_out = outs[2 * i], outs[2 * i + 1]
                rec = {
                    "key": sample_key(q["key"], s),
                    "domain": q["domain"],
                    "query": q["query"],
                    "persona_length": use_length,
                    "placement": placement,
                    "base_answer": base_out.text,
                    "persona_answer": pers_out.text,
                    "base_tokens": base_out.num_tokens,
                    "persona_tokens": pers_out.num_tokens,
                    "base_finish": base_out.finish_reason,
                    "persona_finish": pers_out.finish_reason,
                }
                if s:
                    rec.update(query_key=q["key"], sample=s)
                recs.append(rec)
            store.extend(recs)
            bar.update(len(batch))
    bar.close()
    return len(todo)
