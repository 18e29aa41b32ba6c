"""Stage 2: queries written by the model while it plays each persona.

Per round, every domain still short of queries sends ``ceil(oversample x missing / per_request)`` requests (all
domains in one batched ``generate`` call), each asking for ``per_request`` realistic,
specific user queries, one per line, with the persona (``use_length`` variant) in the configured
placement. Lines are cleaned (numbering, bullets, quotes, "Query:" labels removed; preambles such as
"Here are ten questions:" and too short / too long lines dropped; with ``requests_only`` lines that are
neither a question nor a request dropped) and de-duplicated (case and whitespace insensitive, across
rounds). Rounds repeat until ``queries_per_persona`` are collected or
``max_rounds`` is reached. Sampling is seeded from the run seed, the domain and the round.

Records (``queries.jsonl``): ``key, domain, query, round``. A round's completion is recorded in
``query_rounds.jsonl`` (``key, domain, round, requests, new``) so resuming never repeats a round.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable

from ..config import RunConfig
from ..engines.base import SamplingParams
from ..models import with_persona
from ..progress import progress
from ..store import JsonlStore, RunDir, content_key
from .common import derive_seed, stage_settings
from .prompts import QUERY_PROMPT

log = logging.getLogger(__name__)

_REQUEST_START = re.compile(
    r"^(?:how|what|what's|whats|why|when|where|which|who|whom|whose|is|are|am|was|were|do|does|did|can|"
    r"could|would|will|should|shall|may|might|have|has|had|please|write|tell|explain|describe|give|list|"
    r"suggest|recommend|help|show|create|make|compose|draft|summari[sz]e|compare|translate|find|plan|design|"
    r"generate|teach|share|provide|outline|calculate|convert|fix|rewrite|edit|review|name|define|analy[sz]e|"
    r"walk me|guide me|i need|i want|i'd like|i would like|i'm looking|i am looking|i'm trying|i am trying|"
    r"any (?:tips|ideas|advice|suggestions))\b",
    re.I,
)

_NUMBERING = re.compile(r"^\s*(?:[-*•·–—>]+|\(?\d{1,3}\s*[.):\]]|\d{1,3}\s*-\s|#{1,6})\s*")
_LABEL = re.compile(
    r"^\s*(?:\*\*)?(?:query|question|request|user(?: query)?|prompt|q)\s*\d*\s*(?:\*\*)?\s*[:：-]\s*(?:\*\*)?\s*", re.I
)
_INSTRUCTION = re.compile(
    r"^(?:here (?:are|is)|here's|sure\b|certainly|of course|okay\b|ok\b|absolutely|below (?:are|is)|"
    r"the following|these (?:are|questions|queries)|i hope|i've|i have|let me know|feel free|note:|"
    r"as an? (?:ai|language model)|i can't|i cannot|i'm sorry|great questions)",
    re.I,
)
_QUOTES = "\"'“”‘’`"


TOPIC_PROMPT = "Is the following request about {domain}? Answer with Yes or No only.\n\nRequest: {query}"
"""The topic check (``queries.topic_check``): the query is kept when "Yes" is the likelier answer."""


def on_topic(engine, pairs: list) -> list[bool]:
    """For each ``(domain, query)``: does the model say the query is about the domain? Log-prob
    verdict (P(Yes) >= P(No)) where the engine scores, else the first word of a short greedy reply
    (anything but "no" keeps the query)."""
    if not pairs:
        return []
    chats = [[{"role": "user", "content": TOPIC_PROMPT.format(domain=d, query=q)}] for d, q in pairs]
    scores = engine.score_choices(chats, ["Yes", "No"]) if engine.can_score else None
    if scores is not None:
        return [s["Yes"] >= s["No"] for s in scores]
    outs = engine.generate(chats, SamplingParams(max_new_tokens=3, temperature=0.0))
    return [not re.match(r"\W*no\b", o.text, re.I) for o in outs]


def query_prompt(domain: str, n: int, part: int = 0, parts: int = 1) -> str:
    """The request text. When a round sends several requests they are numbered, so that engines
    that sample identically for an identical prompt and seed (OpenAI-compatible servers) still return
    different lists."""
    text = QUERY_PROMPT.format(n=n, domain=domain)
    if parts > 1:
        text += f" (This is list {part + 1} of {parts}; make it different from the others.)"
    return text


def query_chat(domain: str, persona: str, placement: str, n: int, part: int = 0, parts: int = 1) -> list:
    """The query-writing request, with the persona placed as configured."""
    return with_persona([{"role": "user", "content": query_prompt(domain, n, part, parts)}], persona, placement)


def clean_query_line(line: str, min_chars: int = 15, max_chars: int = 600) -> str:
    """The query in one line of a reply, or ``""`` when the line is not a usable query."""
    s = line.strip()
    for _ in range(3):  # "1. **Query:** ..." needs several passes
        before = s
        s = _NUMBERING.sub("", s).strip()
        s = re.sub(r"^\*\*([^*]+)\*\*\s*", lambda m: m.group(1) + " ", s).strip()
        s = _LABEL.sub("", s).strip()
        if s == before:
            break
    s = s.strip()
    if s[:1] in _QUOTES or s[-1:] in _QUOTES:
        s = s.strip(_QUOTES + " ").strip()
    s = re.sub(r"\s+", " ", s.replace("**", "")).strip()
    if not s or len(s) < min_chars or len(s) > max_chars:
        return ""
    if _INSTRUCTION.match(s) or (s.endswith(":") and len(s.split()) < 15):
        return ""
    if not re.search(r"[A-Za-z]{2}", s):
        return ""
    return s


def looks_like_request(query: str) -> bool:
    """True for a line that reads as a user's question or request: it asks something ("?") or starts
    like a question or an instruction ("How ...", "Write ...", "I need ..."). Drops the fragments a
    small model writes in character ("A wave near you", "The kind of breakfast")."""
    q = query.strip()
    return "?" in q or bool(_REQUEST_START.match(q))


def normalise(query: str) -> str:
    """The de-duplication form: lower case, single spaces, no trailing punctuation."""
    return re.sub(r"\s+", " ", query.lower()).strip().rstrip(".?!").strip()


def parse_queries(text: str, qcfg) -> list[str]:
    """Cleaned queries of one reply, in order (duplicates within the reply removed), with the settings
    of ``qcfg`` (the QueryConfig): lines shorter than ``min_chars`` or longer than ``max_chars`` are
    dropped, and with ``requests_only`` lines that do not read as a question or request too."""
    out, seen = [], set()
    for line in (text or "").splitlines():
        q = clean_query_line(line, qcfg.min_chars, qcfg.max_chars)
        if q and qcfg.requests_only and not looks_like_request(q):
            continue
        if q and normalise(q) not in seen:
            seen.add(normalise(q))
            out.append(q)
    return out


def queries_store(run: RunDir, cfg: RunConfig) -> JsonlStore:
    return run.store("queries", depends_on=stage_settings(cfg, "queries"))


def rounds_store(run: RunDir, cfg: RunConfig) -> JsonlStore:
    return run.store("query_rounds", depends_on=stage_settings(cfg, "queries"))


def write_queries(cfg: RunConfig, run: RunDir, get_engine: Callable, personas: dict) -> dict:
    """Collect the missing queries of every domain; return ``{domain: number collected}``.

    Each round batches the requests of every domain that still needs queries into one ``generate``
    call (so the engine's batch is full), then files the cleaned queries under their domain.
    """
    if cfg.queries.queries_file:
        return add_file_queries(cfg, run)
    store, rounds = queries_store(run, cfg), rounds_store(run, cfg)
    q = cfg.queries
    target = q.queries_per_persona
    have = {d: _domain_queries(store, d) for d in cfg.persona.domains}
    seen = {d: {normalise(x["query"]) for x in have[d]} for d in cfg.persona.domains}
    next_round = {d: sum(1 for r in rounds if r["domain"] == d) for d in cfg.persona.domains}
    bar = progress(total=target * len(cfg.persona.domains), desc="queries", disable=cfg.quiet, unit="query")
    bar.update(sum(min(target, len(v)) for v in have.values()))
    while True:
        todo = [d for d in cfg.persona.domains if len(have[d]) < target and next_round[d] < q.max_rounds]
        if not todo:
            break
        requests = []  # (domain, chat)
        for domain in todo:
            persona = personas[domain][cfg.persona.use_length]
            n_req = math.ceil(q.oversample * (target - len(have[domain])) / max(1, q.per_request))
            requests += [
                (domain, query_chat(domain, persona, cfg.persona.placement, q.per_request, k, n_req))
                for k in range(n_req)
            ]
        params = SamplingParams(
            max_new_tokens=q.max_new_tokens,
            temperature=q.temperature,
            top_p=q.top_p,
            seed=derive_seed(cfg.seed, "queries", *[(d, next_round[d]) for d in todo]),
        )
        outs = get_engine().generate([chat for _, chat in requests], params)
        candidates = _round_candidates(requests, outs, q, seen)
        off = _off_topic(get_engine(), candidates) if q.topic_check else set()
        new_by_domain: dict = {d: [] for d in todo}
        for i, (domain, query) in enumerate(candidates):
            if i in off or len(have[domain]) + len(new_by_domain[domain]) >= target:
                continue
            new_by_domain[domain].append(
                {
                    "key": content_key("query", domain, normalise(query)),
                    "domain": domain,
                    "query": query,
                    "round": next_round[domain],
                }
            )
        store.extend([rec for d in todo for rec in new_by_domain[d]])
        for domain in todo:
            mine = [o for (d, _), o in zip(requests, outs) if d == domain]
            rec = {
                "key": content_key("round", domain, next_round[domain]),
                "domain": domain,
                "round": next_round[domain],
                "requests": len(mine),
                "new": len(new_by_domain[domain]),
                "tokens": sum(o.num_tokens for o in mine),
            }
            if q.topic_check:
                rec["off_topic"] = sum(1 for i in off if candidates[i][0] == domain)
            rounds.append(rec)
            have[domain] = _domain_queries(store, domain)
            next_round[domain] += 1
            bar.update(len(new_by_domain[domain]))
    bar.close()
    for domain in cfg.persona.domains:
        if len(have[domain]) < target:
            log.warning(
                "queries: only %d of %d unique queries for '%s' after %d rounds "
                "(raise queries.max_rounds or queries.per_request)",
                len(have[domain]),
                target,
                domain,
                next_round[domain],
            )
    return {d: min(target, len(v)) for d, v in have.items()}


def _round_candidates(requests: list, outs: list, q, seen: dict) -> list[tuple[str, str]]:
    """``(domain, query)`` of a round's replies not seen before (``seen`` is updated), in order."""
    out = []
    for (domain, _), reply in zip(requests, outs):
        for query in parse_queries(reply.text, q):
            norm = normalise(query)
            if norm not in seen[domain]:
                seen[domain].add(norm)
                out.append((domain, query))
    return out


def _off_topic(engine, candidates: list) -> set:
    """Indices of the candidates the model says are not about their domain (logged)."""
    keep = on_topic(engine, candidates)
    off = {i for i, k in enumerate(keep) if not k}
    for i in sorted(off):
        log.info("queries: off-topic for '%s', dropped: %s", candidates[i][0], candidates[i][1][:100])
    if off:
        log.info("queries: the topic check dropped %d of %d new queries", len(off), len(candidates))
    return off


def add_file_queries(cfg: RunConfig, run: RunDir) -> dict:
    """Store the ``--queries-file`` queries (no generation); return ``{domain: number stored}``.
    Duplicates (case and whitespace insensitive) within a domain are dropped and counted."""
    from .query_file import check_queries_file

    store = queries_store(run, cfg)
    added, in_file, dropped = [], {d: set() for d in cfg.persona.domains}, 0
    for domain, query in check_queries_file(cfg.queries.queries_file, cfg.persona.domains):
        norm = normalise(query)
        key = content_key("query", domain, norm)
        if norm in in_file[domain]:
            dropped += 1
            continue
        in_file[domain].add(norm)
        if key not in store:  # a resumed run stored it already
            added.append({"key": key, "domain": domain, "query": query, "round": 0, "source": "file"})
    store.extend(added)
    if dropped:
        log.info("queries: %d duplicate lines of %s skipped", dropped, cfg.queries.queries_file)
    return {d: min(cfg.queries.queries_per_persona, len(_domain_queries(store, d))) for d in cfg.persona.domains}


def _domain_queries(store: JsonlStore, domain: str) -> list[dict]:
    return [r for r in store if r["domain"] == domain]


def selected_queries(cfg: RunConfig, run: RunDir) -> list[dict]:
    """The queries the later stages use: the first ``queries_per_persona`` of each domain."""
    store = queries_store(run, cfg)
    out = []
    for domain in cfg.persona.domains:
        out.extend(_domain_queries(store, domain)[: cfg.queries.queries_per_persona])
    return out
