"""Stage 2: the model writes the user queries of each domain.

Two formats (``queries.format``):

* ``one`` (default): every chat asks for ONE user request about the domain, written by a rotating
  kind of user ("a beginner", "a professional", ...), and the reply is started with a rotating request
  opener ("How do I", "Can you", "Write", ...; an engine that cannot continue a started reply is told
  to begin with it). The domain sets the topic and the text is a user's request, so the queries read
  like the ones the gate will see. A round sends ``ceil(1.5 * missing) + 1`` such chats per domain,
  stopped at the first line break. Measured on the embedded model in
  ``scripts/query_prompt_study.py`` (docs/bootstrap.md).
* ``list``: ``ceil(oversample x missing / per_request)`` requests per domain and round, each asking for
  ``per_request`` queries one per line, with the persona (``use_length`` variant) in the configured
  placement (the earlier default; a 135M model writes many lines that are not user requests).

Every written line goes through :class:`QueryFilter`: dropped as "unsafe text" when it holds a
control, bidi or zero-width character or a chat-template token (:func:`..text.unsafe_text_reason`), then
cleaned (numbering, bullets, quotes, "Query:"
labels removed, cut after the request's first "?" or sentence), then dropped when it is not a query
(preamble, too short / long), meta-text ("This is a list of 22 questions"), a line in the persona's
voice ("Name: ...", "Arr, matey!"), not a request (with ``requests_only``), or a duplicate or
near-duplicate of a query kept for its domain; every drop is counted by reason. All domains of a round
go in one batched ``generate`` call; rounds repeat until ``queries_per_persona`` are collected or
``max_rounds`` is reached. Sampling is seeded from the run seed, the domain and the round.

Records (``queries.jsonl``): ``key, domain, query, round``. A round's completion is recorded in
``query_rounds.jsonl`` (``key, domain, round, requests, new, written, dropped``) so resuming never
repeats a round and the data report can say how many lines were written and why they were dropped.
Format ``shots`` stores each round's topics in ``query_topics.jsonl`` (``key, domain, round, topics,
tokens``) before that round's requests are written, so a resumed round reuses them.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence

from ..config import RunConfig
from ..engines.base import SamplingParams
from ..models import with_persona
from ..progress import progress
from ..store import JsonlStore, RunDir, content_key
from ..text import jaccard, unsafe_text_reason, word_set
from .common import derive_seed, query_prompt_version, stage_settings
from .personas import join_prefill, personas_settings, run_domains, shown
from .prompts import (
    QUERY_PROMPT,
    REQUEST_OPENERS,
    REQUEST_PROMPT,
    REQUEST_WRITERS,
    SHOTS_NO_PREFILL,
    SHOTS_PROMPT,
    SHOTS_TOPIC_NO_PREFILL,
    SHOTS_TOPIC_PROMPT,
    shots_data_text,
)

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


def parse_queries(text: str, qcfg, persona: str = "") -> list[str]:
    """The usable queries of one reply, in order, through a fresh :class:`QueryFilter` with the
    settings of ``qcfg`` (the QueryConfig)."""
    keep = QueryFilter(qcfg, persona)
    return [q for q in map(keep.add, (text or "").splitlines()) if q]


DROP_REASONS = (
    "unsafe text",
    "not a query",
    "meta-text",
    "persona line",
    "not a request",
    "copied example",
    "duplicate",
    "near-duplicate",
)
"""Why a written line is not kept, in the order the checks run (counted per round in
``query_rounds.jsonl`` and logged)."""

MAX_LINE_CHARS = 4000
"""Longest written line looked at (the request cut from it must fit ``queries.max_chars``)."""
NEAR_DUPLICATE = 0.6
"""Word-set Jaccard at or above which a new query repeats one already kept for its domain."""

_META = re.compile(
    r"\b(?:this (?:is|was) (?:a|the) (?:list|question)|list of \d*\s*(?:questions|queries|requests)|"
    r"the same question|(?:these|the following|above|below) (?:questions|queries|requests|lines)|"
    r"questions? (?:asked|that users)|user(?:'s)? (?:query|question|request|message)|"
    r"as an? (?:ai|assistant|language model)|no numbering|one per line|"
    r"(?:user|someone) might (?:send|ask)|in the user's own words|(?:this|the|an?) (?:ai )?assistant\b|"
    r"write (?:one|a) (?:message|question|request)|the ai\b|chatbot|question or (?:a )?request|"
    r"(?:give|ask|write|suggest|send) (?:me |you )?(?:a|one|another) (?:[\w-]+ )?question|(?:the|a) user(?!\s+(?:manual|interface|guide|story|stories|experience|account|name))|"
    r"ai (?:assistant|system)|smollm)\b",
    re.I,
)
_PERSONA_VOICE = re.compile(
    r"^(?:you are|i am (?:a|an|the|your)\b|i'm (?:a|an|the|your|captain)\b|my name|name\s*:|as (?:a|an|your) \w+,)",
    re.I,
)
_COMMON = {"you", "yes", "no", "i", "me", "my", "the", "a", "hello", "hi", "ok", "okay", "sir", "friend"}


def first_request(line: str) -> str:
    """The line up to its first question mark, else up to its first full stop or exclamation mark:
    a small model keeps talking after the request ("Why does the weather change? On the day I ...")."""
    m = re.search(r"\?|[.!](?=\s|$)", line)
    return (line[: m.end()] if m else line).strip()


def persona_markers(persona: str) -> tuple[str, ...]:
    """Phrases only a line in the persona's voice uses: the persona's quoted phrases ("Arr, matey!")
    and its name ("You are Captain Salty, ...")."""
    marks = [m.strip(" ,.!") for m in re.findall(r'"([^"]{2,40})"', persona or "") if m.lower() not in _COMMON]
    name = re.match(r"\s*You are ((?:[A-Z][a-z]+\s?){1,3})", persona or "")
    if name:
        marks.append(name.group(1).strip())
    return tuple(m for m in marks if m)


class QueryFilter:
    """Keeps the usable queries of one domain and counts every dropped line by reason
    (:data:`DROP_REASONS`). ``kept`` seeds the duplicate checks with the queries stored earlier."""

    def __init__(self, qcfg, persona: str = "", kept: Sequence[str] = (), examples: Sequence[str] = ()):
        self.q = qcfg
        self.examples = [word_set(e) for e in examples]
        self.markers = persona_markers(persona)
        self.seen = {normalise(k) for k in kept}
        self.words = [word_set(k) for k in kept]
        self.dropped: Counter = Counter()
        self.written = 0
        self.special_tokens: tuple[str, ...] = ()
        """The writing engine's tokenizer's special tokens (:func:`tokenizer_specials`), dropped too."""

    def reason(self, line: str, query: str) -> str:
        """Why the cleaned ``line`` (and its request ``query``, :func:`first_request`) is not usable,
        or ``""``."""
        if not query or len(query) < self.q.min_chars or len(query) > self.q.max_chars:
            return "not a query"
        if _META.search(line):
            return "meta-text"
        if _PERSONA_VOICE.match(line) or any(re.search(r"\b" + re.escape(m) + r"\b", line, re.I) for m in self.markers):
            return "persona line"
        if self.q.requests_only and not looks_like_request(query):
            return "not a request"
        words = word_set(query)
        if any(jaccard(words, ex) >= NEAR_DUPLICATE for ex in self.examples):
            return "copied example"
        if normalise(query) in self.seen:
            return "duplicate"
        if any(jaccard(words, other) >= NEAR_DUPLICATE for other in self.words):
            return "near-duplicate"
        return ""

    def add(self, line: str) -> str:
        """The usable query in ``line`` (now kept), or ``""`` (the reason counted)."""
        self.written += 1
        if unsafe_text_reason(line, self.special_tokens):  # control/bidi/zero-width chars, template tokens
            self.dropped["unsafe text"] += 1
            return ""
        cleaned = clean_query_line(line, self.q.min_chars, MAX_LINE_CHARS)
        query = first_request(cleaned)
        why = self.reason(cleaned, query)
        if why:
            self.dropped[why] += 1
            return ""
        self.seen.add(normalise(query))
        self.words.append(word_set(query))
        return query


def tokenizer_specials(engine) -> tuple[str, ...]:
    """The special tokens of ``engine``'s tokenizer when it has one (a local model), those that read as
    markup (``<repo_name>``, ``<|im_sep|>``; never a plain word); ``()`` for a remote engine."""
    tok = getattr(engine, "tokenizer", None)
    try:
        specials = list(getattr(tok, "all_special_tokens", None) or ())
        specials += [str(t) for t in (getattr(tok, "additional_special_tokens", None) or ())]
    except Exception:  # noqa: BLE001 - a tokenizer without these lists filters with the patterns alone
        return ()
    return tuple(sorted({t for t in specials if isinstance(t, str) and len(t) > 2 and re.search(r"[<>\[\]|]", t)}))


def queries_settings(cfg: RunConfig) -> dict:
    """What the query records depend on: the personas' settings, how a persona is shown, and the
    query-writing settings and prompt (or, for ``--queries-file``, the file's content)."""
    q = cfg.queries
    s = personas_settings(cfg)
    use_length, placement = shown(cfg)
    s["persona"].update(use_length=use_length, placement=placement)
    s["queries"] = {
        "per_request": q.per_request,
        "max_rounds": q.max_rounds,
        "max_new_tokens": q.max_new_tokens,
        "temperature": q.temperature,
        "top_p": q.top_p,
        "min_chars": q.min_chars,
        "max_chars": q.max_chars,
        "requests_only": q.requests_only,
        "prompt": query_prompt_version(q.format),
    }
    if q.format != "list":  # absent for the list format, so runs made with it resume unchanged
        s["queries"]["format"] = q.format
    if q.topic_check:  # absent when off, so runs made before the option existed resume unchanged
        s["queries"]["topic_check"] = True
    if q.queries_file:  # user queries: the file's content is what the records depend on
        from .query_file import queries_file_hash

        s["queries"] = {"file": queries_file_hash(q.queries_file)}
    return s


def queries_store(run: RunDir, cfg: RunConfig) -> JsonlStore:
    return run.store("queries", depends_on=stage_settings(cfg, "queries"))


def rounds_store(run: RunDir, cfg: RunConfig) -> JsonlStore:
    return run.store("query_rounds", depends_on=stage_settings(cfg, "queries"))


def write_queries(cfg: RunConfig, run: RunDir, get_engine: Callable, personas: dict) -> dict:
    """Collect the missing queries of every domain; return ``{domain: number collected}``.

    Each round batches the requests of every domain that still needs queries into one ``generate``
    call (so the engine's batch is full), then files the usable queries under their domain.
    """
    if cfg.queries.queries_file:
        return add_file_queries(cfg, run)
    store, rounds = queries_store(run, cfg), rounds_store(run, cfg)
    q, domains = cfg.queries, run_domains(cfg)
    target = q.queries_per_persona
    have = {d: _domain_queries(store, d) for d in domains}
    record_lost_rounds(rounds, have)
    persona = {d: personas[d][shown(cfg)[0]] for d in domains}
    examples = [s["request"] for s in all_shots()] if q.format == "shots" else []
    filters = {d: QueryFilter(q, persona[d], [x["query"] for x in have[d]], examples) for d in domains}
    next_round = {d: sum(1 for r in rounds if r["domain"] == d) for d in domains}
    bar = progress(total=target * len(domains), desc="queries", disable=cfg.quiet, unit="query")
    bar.update(sum(min(target, len(v)) for v in have.values()))
    while True:
        todo = [d for d in domains if len(have[d]) < target and next_round[d] < q.max_rounds]
        if not todo:
            break
        engine = get_engine()
        for f in filters.values():
            f.special_tokens = tokenizer_specials(engine)
        prefill = q.format in ("one", "shots") and engine.supports_prefill
        topics = write_topics(cfg, run, engine, todo, next_round, prefill) if q.format == "shots" else {}
        requests = [
            (d, chat, opener)
            for d in todo
            for chat, opener in round_chats(
                cfg, d, persona[d], target - len(have[d]), next_round[d], prefill, topics.get(d, ())
            )
        ]
        one_line = q.format == "one" or (q.format == "shots" and prefill)
        params = SamplingParams(
            max_new_tokens=min(q.max_new_tokens, ONE_REQUEST_TOKENS) if q.format != "list" else q.max_new_tokens,
            temperature=q.temperature,
            top_p=q.top_p,
            seed=derive_seed(cfg.seed, "queries", *[(d, next_round[d]) for d in todo]),
            stop=("\n",) if one_line else (),
        )
        before = {d: (filters[d].written, Counter(filters[d].dropped)) for d in todo}
        outs = engine.generate([chat for _, chat, _ in requests], params)
        candidates = _round_candidates(requests, outs, filters, prefill and q.format == "one", q.format == "shots")
        off = _off_topic(engine, candidates) if q.topic_check else set()
        new_by_domain: dict = {d: [] for d in todo}
        surplus: Counter = Counter()
        for i, (domain, query) in enumerate(candidates):
            if i in off:
                continue
            if len(have[domain]) + len(new_by_domain[domain]) >= target:
                surplus[domain] += 1
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
            mine = [o for (d, _, _), o in zip(requests, outs) if d == domain]
            written, dropped = before[domain]
            rec = {
                "key": content_key("round", domain, next_round[domain]),
                "domain": domain,
                "round": next_round[domain],
                "requests": len(mine),
                "new": len(new_by_domain[domain]),
                "tokens": sum(o.num_tokens for o in mine),
                "written": filters[domain].written - written,
                "dropped": dict(filters[domain].dropped - dropped),
                "surplus": surplus[domain],
            }
            if q.format == "shots":
                rec["topics"] = list(topics.get(domain, ()))
            if q.topic_check:
                rec["off_topic"] = sum(1 for i in off if candidates[i][0] == domain)
            rounds.append(rec)
            _log_round(rec)
            have[domain] = _domain_queries(store, domain)
            next_round[domain] += 1
            bar.update(len(new_by_domain[domain]))
    bar.close()
    for domain in domains:
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


def record_lost_rounds(rounds: JsonlStore, have: dict) -> None:
    """A kill between a round's queries append and its round record leaves queries of a round that
    ``query_rounds.jsonl`` lacks: record that round from its queries (its request and token counts are
    lost with the kill), so it is neither repeated nor missing from the counts."""
    recorded = {(r["domain"], r["round"]) for r in rounds}
    for domain, queries in have.items():
        lost = sorted({q["round"] for q in queries if "round" in q} - {r for d, r in recorded if d == domain})
        for rnd in lost:
            new = sum(1 for q in queries if q.get("round") == rnd)
            key = content_key("round", domain, rnd)
            rounds.append(
                {"key": key, "domain": domain, "round": rnd, "requests": 0, "new": new, "tokens": 0, "recovered": True}
            )


ONE_REQUEST_TOKENS = 48
"""Token budget of one ``one``-format request (one line; ``queries.max_new_tokens`` caps it too)."""
OVERSHOOT = 1.5
"""``one`` format: chats per round = ``ceil(OVERSHOOT * missing) + 1`` (some lines are dropped)."""


def round_chats(
    cfg, domain: str, persona: str, missing: int, round_: int, prefill: bool, topics: Sequence[str] = ()
) -> list[tuple[list, str]]:
    """``(chat, prefill)`` of one domain's requests in one round (``prefill`` = "" when the reply is
    not started; format ``shots``: the written ``topics`` of the domain, one per chat in turn)."""
    q = cfg.queries
    if q.format == "list":
        n_req = math.ceil(q.oversample * missing / max(1, q.per_request))
        return [(query_chat(domain, persona, shown(cfg)[1], q.per_request, k, n_req), "") for k in range(n_req)]
    if q.format == "shots":
        topics = list(topics) or [domain]
        out = []
        for i in range(math.ceil(OVERSHOOT * missing) + 1):
            rng = random.Random(derive_seed(cfg.seed, "shots", domain, round_, i))
            out.append(shots_chat(domain, topics[i % len(topics)], pick_shots(domain, rng), prefill))
        return out
    out = []
    for i in range(math.ceil(OVERSHOOT * missing) + 1):
        k = i + 5 * round_
        opener = REQUEST_OPENERS[k % len(REQUEST_OPENERS)]
        writer = REQUEST_WRITERS[(k // len(REQUEST_OPENERS) + round_) % len(REQUEST_WRITERS)]
        out.append(request_chat(domain, writer, opener, prefill))
    return out


SHOTS_PER_PROMPT = 4
"""``shots`` format: example requests (each of another domain) in one request-writing prompt."""
TOPIC_CHATS = 2
"""``shots`` format: topic-listing chats per domain and round (their topics are pooled)."""
TOPIC_EXAMPLES = 3
"""``shots`` format: example fields (with their topics) in one topic-listing prompt."""
TOPIC_TOKENS = 60
TOPIC_TEMPERATURE = 0.7
MAX_TOPICS = 12
_TOPIC_LINE = re.compile(r"^\s*(?:field|topic|topics|request)\s*:", re.I)
_FIELD_LINE = re.compile(r"^\s*(?:field|topics?)\s*:", re.I)


def shots_data() -> list[dict]:
    """The shipped example domains: ``[{"domain", "topics", "requests": [{"topic", "request"}]}]``."""
    return json.loads(shots_data_text())["domains"]


def all_shots() -> list[dict]:
    """Every shipped example request: ``{"domain", "topic", "request"}``."""
    return [{"domain": e["domain"], **r} for e in shots_data() for r in e["requests"]]


def related_domains(a: str, b: str) -> bool:
    """True when two domain names may name the same field: they share a word of 3+ letters, compared
    by its first 5 letters ("creative writing" / "writing", "law" / "tax law", "medicine" / "medical")."""
    x, y = (re.findall(r"[a-z]{3,}", normalise(n)) for n in (a, b))
    return bool({w[:5] for w in x} & {w[:5] for w in y}) or normalise(a) == normalise(b)


def other_domains(domain: str) -> list[dict]:
    """The shipped example domains unrelated to ``domain`` (a prompt never shows the target's own)."""
    return [e for e in shots_data() if not related_domains(e["domain"], domain)]


def pick_shots(domain: str, rng: random.Random, k: int = SHOTS_PER_PROMPT) -> list[dict]:
    """``k`` example requests of ``k`` different domains unrelated to ``domain``."""
    fields = rng.sample(other_domains(domain), k)
    return [{"domain": e["domain"], **rng.choice(e["requests"])} for e in fields]


def shots_chat(domain: str, topic: str, shots: Sequence[dict], prefill: bool) -> tuple[list, str]:
    """A ``shots``-format chat: the examples, then the reply started with the target's field, topic and
    "Request:" (``prefill``), or asked for the request only."""
    block = "\n\n".join(f"Field: {s['domain']}\nTopic: {s['topic']}\nRequest: {s['request']}" for s in shots)
    text = SHOTS_PROMPT.format(examples=block)
    if not prefill:
        return [{"role": "user", "content": text + SHOTS_NO_PREFILL.format(domain=domain, topic=topic)}], ""
    start = f"Field: {domain}\nTopic: {topic}\nRequest:"
    return [{"role": "user", "content": text}, {"role": "assistant", "content": start}], start


def topic_chat(domain: str, rng: random.Random, prefill: bool) -> list:
    """A ``shots``-format topic-listing chat: the topics of a few other fields, then the domain's."""
    fields = rng.sample(other_domains(domain), TOPIC_EXAMPLES)
    block = "\n\n".join(f"Field: {e['domain']}\nTopics: {', '.join(e['topics'])}" for e in fields)
    text = SHOTS_TOPIC_PROMPT.format(examples=block, domain=domain)
    if not prefill:
        return [{"role": "user", "content": text + SHOTS_TOPIC_NO_PREFILL}]
    return [{"role": "user", "content": text}, {"role": "assistant", "content": f"Field: {domain}\nTopics:"}]


def parse_topics(text: str) -> list[str]:
    """The topics of a topic-listing reply: comma / semicolon / line separated, 1-5 words of at most
    40 characters, no labels, no repeats (case-insensitive), at most :data:`MAX_TOPICS`."""
    out: list[str] = []
    for part in re.split(r"[,;\n]", text or ""):
        t = _TOPIC_LINE.sub("", part)
        t = re.sub(r"^\s*(?:and|or)\s+", "", _NUMBERING.sub("", t.strip())).strip(" .*\"'")
        if not t or len(t) > 40 or not 1 <= len(t.split()) <= 5 or not re.search(r"[A-Za-z]{3}", t):
            continue
        if t.lower() not in {o.lower() for o in out}:
            out.append(t)
    return out[:MAX_TOPICS]


def topics_store(run: RunDir, cfg: RunConfig) -> JsonlStore:
    return run.store("query_topics", depends_on=stage_settings(cfg, "queries"))


def write_topics(cfg, run: RunDir, engine, domains: Sequence[str], rounds: dict, prefill: bool) -> dict:
    """``{domain: topics}`` the model lists for each domain this round (one batched call; a domain
    without a usable topic gets none, its requests are then about the domain itself). Stored in
    ``query_topics.jsonl`` (``key, domain, round, topics, tokens``) before the requests are written, so
    a resumed round reuses them instead of writing them again."""
    store = topics_store(run, cfg)
    stored = {(r["domain"], r["round"]): r["topics"] for r in store}
    missing = [d for d in domains if (d, rounds[d]) not in stored]
    if missing:
        stored.update(_new_topics(cfg, store, engine, missing, rounds, prefill))
    return {d: stored[(d, rounds[d])] for d in domains}


def _new_topics(cfg, store: JsonlStore, engine, domains: Sequence[str], rounds: dict, prefill: bool) -> dict:
    chats = [
        (d, topic_chat(d, random.Random(derive_seed(cfg.seed, "topics", d, rounds[d], i)), prefill))
        for d in domains
        for i in range(TOPIC_CHATS)
    ]
    params = SamplingParams(
        max_new_tokens=TOPIC_TOKENS,
        temperature=TOPIC_TEMPERATURE,
        top_p=cfg.queries.top_p,
        seed=derive_seed(cfg.seed, "topics", *[(d, rounds[d]) for d in domains]),
        stop=("\n",) if prefill else (),
    )
    outs = engine.generate([c for _, c in chats], params)
    topics: dict = {d: [] for d in domains}
    tokens: Counter = Counter()
    for (d, _), o in zip(chats, outs):
        topics[d].extend(t for t in parse_topics(o.text) if t.lower() not in {x.lower() for x in topics[d]})
        tokens[d] += o.num_tokens
    recs = [
        {
            "key": content_key("topics", d, rounds[d]),
            "domain": d,
            "round": rounds[d],
            "topics": topics[d][:MAX_TOPICS],
            "tokens": tokens[d],
        }
        for d in domains
    ]
    store.extend(recs)
    return {(r["domain"], r["round"]): r["topics"] for r in recs}


def request_chat(domain: str, writer: str, opener: str, prefill: bool) -> tuple[list, str]:
    """A ``one``-format chat: the reply started with ``opener`` (``prefill``), or told to begin with it."""
    text = REQUEST_PROMPT.format(writer=writer, domain=domain)
    if not prefill:
        return [{"role": "user", "content": f'{text} Begin it with "{opener}".'}], ""
    return [{"role": "user", "content": text}, {"role": "assistant", "content": opener}], opener


def _round_candidates(
    requests: list, outs: list, filters: dict, prefill: bool, shots: bool = False
) -> list[tuple[str, str]]:
    """``(domain, query)`` of a round's usable lines, in order (the domain filters count the others)."""
    out = []
    for (domain, _, opener), reply in zip(requests, outs):
        text = join_prefill(opener, reply.text) if prefill else reply.text
        for line in text.splitlines():
            if shots and _FIELD_LINE.match(line):  # the "Field: ..." / "Topic: ..." lines of a shots reply
                continue
            query = filters[domain].add(line)
            if query:
                out.append((domain, query))
    return out


def _log_round(rec: dict) -> None:
    if rec["dropped"]:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(rec["dropped"].items()))
        log.info(
            "queries: '%s' round %d: %d lines written, %d kept; dropped: %s",
            rec["domain"],
            rec["round"] + 1,
            rec["written"],
            rec["new"],
            reasons,
        )


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

    store, domains = queries_store(run, cfg), run_domains(cfg)
    added, in_file, dropped = [], {d: set() for d in domains}, 0
    for domain, query in check_queries_file(cfg.queries.queries_file, domains):
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
    return {d: min(cfg.queries.queries_per_persona, len(_domain_queries(store, d))) for d in domains}


def _domain_queries(store: JsonlStore, domain: str) -> list[dict]:
    return [r for r in store if r["domain"] == domain]


def query_stats(cfg: RunConfig, run: RunDir, collected: dict) -> dict:
    """Per domain: lines the model ``written``, ``usable`` queries collected, and ``dropped`` lines by
    reason, summed over the rounds in ``query_rounds.jsonl`` (``written`` is ``None`` for a queries
    file or rounds recorded before the filters were counted)."""
    rounds = rounds_store(run, cfg)
    out = {}
    for d in run_domains(cfg):
        mine = [r for r in rounds if r["domain"] == d]
        dropped: Counter = Counter()
        for r in mine:
            dropped.update(r.get("dropped") or {})
        counted = bool(mine) and all("written" in r for r in mine)
        written = sum(r["written"] for r in mine) if counted else None
        out[d] = {"written": written, "usable": collected.get(d, 0), "dropped": dict(dropped)}
    return out


def selected_queries(cfg: RunConfig, run: RunDir) -> list[dict]:
    """The queries the later stages use: the first ``queries_per_persona`` of each domain."""
    store = queries_store(run, cfg)
    out = []
    for domain in run_domains(cfg):
        out.extend(_domain_queries(store, domain)[: cfg.queries.queries_per_persona])
    return out


def target(cfg: RunConfig) -> int:
    """Queries per persona the run asks for (a larger number extends a finished bootstrap)."""
    return cfg.queries.queries_per_persona


def check(cfg: RunConfig) -> None:
    """One-line errors before anything runs: a ``--queries-file`` that cannot be read or names a domain
    the run lacks."""
    if cfg.queries.queries_file:
        from .query_file import check_queries_file

        check_queries_file(cfg.queries.queries_file, run_domains(cfg))


def step(ctx) -> None:
    """Collect the missing queries; publish ``collected``, the selected ``queries``, ``query_stats`` and
    the ``target`` per persona."""
    collected = write_queries(ctx.cfg, ctx.run, ctx.engine, ctx.outputs["personas"])
    ctx.outputs["collected"] = collected
    ctx.outputs["queries"] = selected_queries(ctx.cfg, ctx.run)
    ctx.outputs["query_stats"] = query_stats(ctx.cfg, ctx.run, collected)
    ctx.outputs["target"] = ctx.options.queries_per_persona
