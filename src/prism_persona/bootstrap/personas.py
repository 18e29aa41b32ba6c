"""Stage 1: the model writes an expert persona per domain, in up to three lengths.

Each persona is a second-person description ("You are ..."). The model's reply is cleaned
(quotes, "Sure, here is..." preambles, markdown headers and labels removed); a reply that does not
yield a usable description is replaced by a deterministic template and counted as a fallback.
A ``--persona-file DOMAIN=PATH`` is used verbatim for all lengths of that domain.

Records (``personas.jsonl``): ``key, domain, length, text, source (model|fallback|file), raw,
num_tokens``.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable

from ..config import PERSONA_LENGTHS, RunConfig
from ..engines.base import SamplingParams
from ..errors import PrismError
from ..progress import progress
from ..store import JsonlStore, RunDir, content_key
from .common import chunks, derive_seed, persona_file_text, stage_settings

log = logging.getLogger(__name__)

LENGTH_SPECS = {
    "min": ("in one short sentence", 5, 40),
    "short": ("in about 50 words", 8, 110),
    "long": ("in about 150 words", 12, 300),
}
"""length -> (phrase in the prompt, fewest words accepted, most words kept)."""

PERSONA_PROMPT = (
    "Write a description of an expert in {domain}, addressed directly to that expert in the second "
    "person, {phrase}. Describe their expertise, experience and how they help people. "
    'Start with "You are". Reply with the description only.'
)

FALLBACK = {
    "min": "You are an expert in {domain}.",
    "short": (
        "You are an expert in {domain} with many years of hands-on experience. You give accurate, "
        "specific and practical answers, explain your reasoning clearly, point out common mistakes "
        "and trade-offs, and adapt your advice to the person asking."
    ),
    "long": (
        "You are an expert in {domain} with many years of hands-on experience, deep knowledge of its "
        "fundamentals and of current best practice. People come to you for advice they can act on, "
        "so you give accurate, specific and practical answers rather than generalities. You explain "
        "your reasoning step by step when it helps, use concrete examples, and say plainly when "
        "something depends on details you do not have or when you are unsure. You point out common "
        "mistakes, risks and trade-offs, suggest better alternatives when the request is misguided, "
        "and keep your answers well organised and no longer than they need to be. You adapt your "
        "explanations to the person asking, whether a beginner or a fellow expert, and you always "
        "stay honest, careful and respectful."
    ),
}

_PREAMBLE = re.compile(
    r"^(?:sure|certainly|of course|okay|ok|absolutely|great|here(?:'s| is| are)|below is|the following)\b"
    r"[^\n]*?(?::|!|\.)\s*(?:\n|$)",
    re.I,
)
_LABEL = re.compile(
    r"^\s*(?:\*\*)?(?:persona|description|expert(?: persona)?|profile|bio)(?:\*\*)?\s*:\s*(?:\*\*)?\s*", re.I
)
_HEADER = re.compile(r"^\s*#{1,6}\s.*$|^\s*\*\*[^*\n]{0,80}\*\*\s*:?\s*$", re.M)
_TRAILER = re.compile(r"\n\s*(?:let me know|i hope|feel free|note:|this (?:description|persona))[^\n]*$", re.I)
_QUOTES = "\"'“”‘’`"


def persona_prompt(domain: str, length: str, prefill: str) -> list:
    """The persona-writing chat; with ``prefill`` the assistant's reply is started with that text."""
    phrase = LENGTH_SPECS[length][0]
    chat = [{"role": "user", "content": PERSONA_PROMPT.format(domain=domain, phrase=phrase)}]
    if prefill:
        chat.append({"role": "assistant", "content": prefill})
    return chat


def join_prefill(prefill: str, continuation: str) -> str:
    """The whole reply of a prefilled generation (engines return only the continuation, stripped)."""
    if not prefill:
        return continuation
    if continuation[:1].isalnum():
        return prefill + " " + continuation
    return prefill + continuation


_AI_SELF = re.compile(r"^you are (?:an? )?(?:ai|artificial intelligence|language model|assistant|chatbot)\b", re.I)


def mentions_domain(text: str, domain: str) -> bool:
    """Whether a persona names its domain: some word of the domain (its first five letters, so
    'medicine' matches 'medical') occurs in the text. A domain with no word of 3+ letters never does."""
    stems = [w[:5] for w in re.findall(r"[^\W\d_]{3,}", domain.lower())]
    if not stems:
        return False
    words = re.findall(r"[^\W\d_]+", text.lower())
    return any(w.startswith(stem) for stem in stems for w in words)


def fallback_persona(domain: str, length: str) -> str:
    return FALLBACK[length].format(domain=domain)


def _strip_quotes(text: str) -> str:
    """Remove quotes wrapped around the whole text (also a lone opening quote of a cut-off reply)."""
    text = text.strip()
    if text[:1] in _QUOTES:
        text = text.lstrip(_QUOTES + " ")
        text = text.rstrip(_QUOTES + " ")
    elif len(text) > 1 and text[-1] in _QUOTES and text.count(text[-1]) == 1:
        text = text[:-1].rstrip()
    return text


def _first_sentences(text: str, max_words: int, one: bool) -> str:
    """Keep whole sentences up to ``max_words`` words (just the first one if ``one``)."""
    sentences = re.split(r"(?<=[.!?])\s+", text)
    kept, words, seen = [], 0, set()
    for s in sentences:
        norm = re.sub(r"\W+", " ", s.lower()).strip()
        if norm in seen:  # degenerate repetition ("You are X. You are X. ...")
            continue
        seen.add(norm)
        n = len(s.split())
        if kept and (one or words + n > max_words):
            break
        kept.append(s)
        words += n
    out = " ".join(kept)
    if len(out.split()) > max_words:  # one run-on sentence: cut at the word limit
        out = " ".join(out.split()[:max_words]).rstrip(",;:") + "."
    return out


def clean_persona(raw: str, length: str, domain: str = "", other_domains=()) -> str:
    """The usable "You are ..." description inside a model reply, or ``""`` if there is none.

    With ``domain``, a description that does not name its domain is not usable when it names one of
    ``other_domains`` instead (the wrong expert) or casts the reader as an AI assistant ("You are an
    AI designed to help..."). Synonyms are not checked: a cooking persona about "culinary art" passes.
    """
    text = (raw or "").replace("\r", "").strip()
    text = _HEADER.sub("", text).strip()
    for _ in range(2):
        text = _PREAMBLE.sub("", text, count=1).strip()
    text = _LABEL.sub("", text).strip()
    text = _TRAILER.sub("", text).strip()
    text = _strip_quotes(text)
    m = re.search(r"\b(you are|you're)\b", text, re.I)
    if not m:
        return ""
    text = text[m.start() :]
    text = text[0].upper() + text[1:]
    text = re.sub(r"\*\*|__", "", text)
    text = re.sub(r"\s*\n+\s*", " ", text).strip()
    text = _strip_quotes(text)
    _, min_words, max_words = LENGTH_SPECS[length]
    text = _first_sentences(text, max_words, one=(length == "min"))
    if len(text.split()) < min_words:
        return ""
    if domain and not mentions_domain(text, domain):
        wrong = any(mentions_domain(text, d) for d in other_domains if d != domain)
        if wrong or _AI_SELF.match(text):
            return ""
    if text[-1] not in ".!?":
        text += "."
    return text


def persona_file_hashes(cfg: RunConfig) -> dict:
    """domain -> sha1 of the persona file's text (so an edited file is noticed on resume)."""
    return {
        d: hashlib.sha1(persona_file_text(p, d).encode("utf-8")).hexdigest()[:16]
        for d, p in sorted(cfg.persona.persona_files.items())
    }


# What later stages read of this stage's settings (the ``persona`` block is read only in this module).


def run_domains(cfg: RunConfig) -> list[str]:
    """The run's domains: every stage's records are keyed by domain."""
    return list(cfg.persona.domains)


def shown(cfg: RunConfig) -> tuple[str, str]:
    """``(use_length, placement)``: which persona variant the later stages show, and where in the chat."""
    return cfg.persona.use_length, cfg.persona.placement


def persona_files(cfg: RunConfig) -> dict:
    """``{domain: path}`` of the personas given as files (``prism check`` judges with them)."""
    return dict(cfg.persona.persona_files)


def check(cfg: RunConfig) -> None:
    """One-line errors before anything runs: no domain, a missing or empty persona file."""
    if not cfg.persona.domains:
        raise PrismError('no domains given; use --domains "writing,coding,safety"')
    persona_file_hashes(cfg)


def step(ctx) -> None:
    """Write the missing personas; publish ``persona_counts``, ``personas`` and ``domains``."""
    ctx.outputs["persona_counts"] = write_personas(ctx.cfg, ctx.run, ctx.engine)
    ctx.outputs["personas"] = load_personas(ctx.run)
    ctx.outputs["domains"] = list(ctx.options.domains)


def personas_settings(cfg: RunConfig) -> dict:
    """What the persona records depend on (the first stage: also the model and the seed every later
    stage depends on): the persona-writing settings and the content of the persona files."""
    p = cfg.persona
    s: dict = {
        "model": cfg.model.model,
        "seed": cfg.seed,
        "persona": {
            "max_new_tokens": p.max_new_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "files": persona_file_hashes(cfg),
        },
    }
    if p.prefill and any(d not in p.persona_files for d in p.domains):  # the model writes some personas
        # absent when off: runs made before the prefill existed resume with --set persona.prefill=""
        s["persona"]["prefill"] = p.prefill
    return s


def personas_store(run: RunDir, cfg: RunConfig) -> JsonlStore:
    return run.store("personas", depends_on=stage_settings(cfg, "personas"))


def write_personas(cfg: RunConfig, run: RunDir, get_engine: Callable) -> dict:
    """Write the personas missing from ``personas.jsonl``; return counts by source."""
    store = personas_store(run, cfg)
    p = cfg.persona
    todo = []
    file_records = []
    for domain in p.domains:
        for length in p.lengths:
            key = content_key("persona", domain, length)
            if key in store:
                continue
            if domain in p.persona_files:
                text = persona_file_text(p.persona_files[domain], domain)
                file_records.append(
                    {
                        "key": key,
                        "domain": domain,
                        "length": length,
                        "text": text,
                        "source": "file",
                        "raw": "",
                        "num_tokens": 0,
                    }
                )
            else:
                todo.append((key, domain, length))
    store.extend(file_records)
    if todo:
        engine = get_engine()
        if p.prefill and not engine.supports_prefill:
            log.warning(
                "personas: the %s engine cannot continue a started reply; writing personas without the prefill %r",
                engine.name,
                p.prefill,
            )
        bar = progress(total=len(todo), desc="personas", disable=cfg.quiet, unit="persona")
        for batch in chunks(todo, cfg.model.batch_size):
            recs = _generate_batch(engine, batch, cfg)
            store.extend(recs)
            bar.update(len(batch))
        bar.close()
    counts = {"model": 0, "fallback": 0, "file": 0}
    for rec in store:
        if rec["domain"] in p.domains and rec["length"] in p.lengths:
            counts[rec["source"]] = counts.get(rec["source"], 0) + 1
    if counts["fallback"]:
        log.warning(
            "personas: %d of %d replies were unusable and replaced by the template persona",
            counts["fallback"],
            sum(counts.values()),
        )
    return counts


def _generate_batch(engine, batch: list, cfg: RunConfig) -> list[dict]:
    p = cfg.persona
    prefill = p.prefill if engine.supports_prefill else ""
    chats = [persona_prompt(domain, length, prefill) for _, domain, length in batch]
    seed = derive_seed(cfg.seed, "personas", [k for k, _, _ in batch])
    params = SamplingParams(max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p, seed=seed)
    outs = engine.generate(chats, params)
    recs = []
    for (key, domain, length), out in zip(batch, outs):
        raw = join_prefill(prefill, out.text)
        text = clean_persona(raw, length, domain, p.domains)
        source = "model"
        if not text:
            text, source = fallback_persona(domain, length), "fallback"
            log.info("personas: unusable %s persona for '%s'; using the template", length, domain)
        recs.append(
            {
                "key": key,
                "domain": domain,
                "length": length,
                "text": text,
                "source": source,
                "raw": raw,
                "num_tokens": out.num_tokens,
            }
        )
    return recs


def load_personas(run) -> dict:
    """``{domain: {length: text}}`` from ``RUN/personas.jsonl`` (``run`` is a RunDir or a path)."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    path = run.path("personas.jsonl")
    out: dict = {}
    if not path.exists():
        return out
    for rec in JsonlStore(path):
        out.setdefault(rec["domain"], {})[rec["length"]] = rec["text"]
    return out


__all__ = ["load_personas", "write_personas", "clean_persona", "fallback_persona", "persona_prompt", "PERSONA_LENGTHS"]
