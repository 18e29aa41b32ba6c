"""Systems under evaluation, their personas, and the engines behind them.

A system is written as ``KIND[@DOMAIN][/LENGTH][/PLACEMENT]``:

* ``base``: the model as is.
* ``persona``: the *matched* expert persona of each item's category (see :func:`match_domains`: each
  benchmark declares its categories' personas);
  ``persona@coding``: the coding persona on every item; ``persona/min/user``: the min-length persona
  prepended to the user message.
* ``random``: a persona from an unrelated domain (seeded per item), same length/placement options.
* ``lora``: the PRISM adapter always on (``as_engine(force=True)``).
* ``prism``: the gated model (``as_engine()``); routing is recorded per response.
* ``oracle``: per item the better of ``base`` and ``lora`` by the judge (the upper bound of a perfect gate);
  derived from their cached results, nothing is generated for it.
* ``answers`` (not written in ``--systems``; made by ``--fastchat-answers``): another system's MT-Bench
  answers read from a FastChat ``model_answer`` file, named by its model id.

Personas come from a run directory (``bootstrap.personas.load_personas``), a JSON file
``{domain: {min|short|long: text}}`` (or ``{domain: text}``), or, for a category no domain matches,
a built-in generic expert persona for the category's field.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..config import PERSONA_LENGTHS, PLACEMENTS, check_text
from ..errors import PrismError

log = logging.getLogger(__name__)

KINDS = ("base", "persona", "random", "lora", "prism", "oracle")


def match_domains(category: str) -> tuple:
    """Preferred persona domain names of a benchmark category, best first (case-insensitive; a domain
    matches when its name equals a candidate or contains it): what the registered benchmark that lists
    the category declares (``Benchmark.personas``), else the category's own name."""
    from .benchmarks import category_persona  # the registered benchmarks (imported on use: they import this)

    known = category_persona(category)
    return known.domains if known else (category.lower(),)


def persona_field(category: str) -> str:
    """The field of the built-in expert persona of a category no persona domain matches."""
    from .benchmarks import category_persona

    known = category_persona(category)
    return known.field if known else category


RANDOM_FIELDS = (
    "marine biology",
    "medieval history",
    "professional cooking",
    "football coaching",
    "interior design",
    "ornithology",
    "tax accounting",
    "opera singing",
)


def generic_persona(field: str, length: str = "short") -> str:
    """A built-in expert persona for ``field`` (used when no bootstrapped domain matches)."""
    minimal = f"You are an expert in {field}."
    short = (
        f"You are a renowned expert in {field} with many years of experience. You give accurate, "
        f"well-structured and practical answers, explain your reasoning clearly, and pay close "
        f"attention to every detail of the request."
    )
    if length == "min":
        return minimal
    if length == "short":
        return short
    return (
        short + f" Colleagues seek you out because you combine deep knowledge of {field} with the "
        f"ability to explain it to anyone: you check facts before stating them, say so when you are "
        f"unsure, structure long answers with clear steps, give concrete examples, and never pad an "
        f"answer with filler. You follow the user's instructions exactly, including any requested "
        f"format or length, and you decline requests that could cause harm while offering a safe "
        f"alternative where one exists."
    )


@dataclass(frozen=True)
class SystemSpec:
    kind: str
    domain: Optional[str] = None
    length: str = "short"
    placement: str = "system"

    @property
    def name(self) -> str:
        if self.kind == "answers":  # another tool's answers (FastChat model_answer file): the model id
            return str(self.domain)
        if self.kind not in ("persona", "random"):
            return self.kind
        s = self.kind + (f"@{self.domain}" if self.domain else "")
        if self.length != "short":
            s += f"/{self.length}"
        if self.placement != "system":
            s += f"/{self.placement}"
        return s

    @property
    def uses_persona(self) -> bool:
        return self.kind in ("persona", "random")


def parse_system(text: str, length: str = "short", placement: str = "system") -> SystemSpec:
    """``persona@coding/min/user`` -> :class:`SystemSpec` (defaults from ``--persona-length/--placement``)."""
    raw = text.strip()
    head, *mods = raw.split("/")
    kind, _, domain = head.partition("@")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise PrismError(
            f"unknown system '{raw}'; choose from {', '.join(KINDS)} "
            f"(persona/random accept @DOMAIN, /min|short|long and /system|user)"
        )
    if (domain or mods) and kind not in ("persona", "random"):
        raise PrismError(f"system '{raw}': only persona and random take @DOMAIN or /options")
    if domain and kind == "random":
        raise PrismError(f"system '{raw}': random picks its own domain; drop @{domain}")
    for m in mods:
        m = m.strip()
        if m in PERSONA_LENGTHS:
            length = m
        elif m in PLACEMENTS:
            placement = m
        else:
            raise PrismError(f"system '{raw}': unknown option '{m}' (use min, short, long, system or user)")
    return SystemSpec(kind, domain.strip() or None, length, placement)


def parse_systems(text: str, length: str = "short", placement: str = "system") -> list[SystemSpec]:
    specs = [parse_system(s, length, placement) for s in text.split(",") if s.strip()]
    if not specs:
        raise PrismError("--systems is empty; e.g. --systems base,persona,prism")
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise PrismError(f"system listed twice: {', '.join(dupes)}")
    return specs


def parse_match(text: Optional[str]) -> dict[str, str]:
    """``"writing=writing,coding=code,STEM=science"`` or a JSON file -> {category: domain}."""
    if not text:
        return {}
    p = Path(text).expanduser()
    if p.suffix.lower() == ".json" or p.is_file():
        if not p.is_file():
            raise PrismError(f"persona map file not found: {p}")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise PrismError(f"persona map file {p} is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise PrismError(f"persona map file {p}: expected an object category -> domain")
        return {str(k): str(v) for k, v in data.items()}
    out = {}
    for part in text.split(","):
        if part.strip():
            if "=" not in part:
                raise PrismError(f"--persona-map wants CATEGORY=DOMAIN pairs, got '{part}'")
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def load_persona_file(path: str | Path) -> dict[str, dict[str, str]]:
    """``{domain: {length: text}}`` from JSON (``{domain: text}`` means the same text for every length)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise PrismError(f"persona file not found: {p}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as exc:  # UnicodeDecodeError included
        raise PrismError(f"persona file {p} is not valid JSON ({exc})") from None
    except RecursionError:
        raise PrismError(f"persona file {p} is nested too deeply to be a persona file") from None
    if not isinstance(data, dict) or not data:
        raise PrismError(f"persona file {p}: expected an object {{domain: {{min|short|long: text}}}}")
    out = {}
    for dom, v in data.items():
        if isinstance(v, str):
            v = {k: v for k in PERSONA_LENGTHS}
        if not isinstance(v, dict) or not all(isinstance(t, str) and t.strip() for t in v.values()):
            raise PrismError(f"persona file {p}: domain '{dom}' must map to text or {{length: text}}")
        for length, text in v.items():
            check_text(text, f"persona file {p}: domain '{dom}' ({length})")
        out[str(dom)] = dict(v)
    return out


def load_run_personas(run_path: str | Path) -> dict[str, dict[str, str]]:
    """Personas of a bootstrap run directory via ``bootstrap.personas.load_personas``."""
    from ..bootstrap.personas import load_personas
    from ..store import RunDir

    p = Path(run_path).expanduser()
    if not p.is_dir():
        raise PrismError(f"run directory not found: {p}")
    personas = load_personas(RunDir(p))
    if not personas:
        raise PrismError(f"{p} has no personas (run `prism bootstrap` first, or pass --persona-file)")
    return personas


class PersonaBook:
    """Chooses the persona text for (system, category, item): matched, fixed domain or random."""

    def __init__(self, personas: Optional[dict] = None, match: Optional[dict] = None, seed: int = 0):
        self.personas = {str(k): dict(v) for k, v in (personas or {}).items()}
        self.match = dict(match or {})
        self.seed = seed

    def domain_for(self, category: str) -> Optional[str]:
        """The domain matched to ``category``: explicit map, then the preference list; ``None`` = generic."""
        doms = list(self.personas)
        if category in self.match:
            want = self.match[category]
            if want not in self.personas and not want.startswith("generic"):
                raise PrismError(
                    f"persona map sends '{category}' to domain '{want}', which has no persona "
                    f"(have: {', '.join(doms) or 'none'})"
                )
            return want if want in self.personas else None
        lower = {d.lower(): d for d in doms}
        candidates = match_domains(category)
        for cand in candidates:
            if cand.lower() in lower:
                return lower[cand.lower()]
        for cand in candidates:
            for d in doms:
                if cand.lower() in d.lower() or d.lower() in cand.lower():
                    return d
        return None

    def text(self, domain: Optional[str], length: str, category: str) -> tuple[str, str]:
        """(persona text, domain label); generic built-in text when ``domain`` is None."""
        if domain is None:
            return generic_persona(persona_field(category), length), f"generic:{category}"
        if domain not in self.personas:
            if domain.startswith("generic:"):
                cat = domain.split(":", 1)[1]
                return generic_persona(persona_field(cat), length), domain
            raise PrismError(f"no persona for domain '{domain}' (have: {', '.join(self.personas) or 'none'})")
        variants = self.personas[domain]
        text = variants.get(length) or variants.get("short") or next(iter(variants.values()))
        return text, domain

    def for_item(self, spec, category: str, item_id: str) -> tuple[Optional[str], Optional[str]]:
        """(persona text or None, domain label or None) for a system on one item."""
        if spec.kind == "persona":
            dom = spec.domain if spec.domain else self.domain_for(category)
            return self.text(dom, spec.length, category)
        if spec.kind == "random":
            return self.random_for(category, item_id, spec.length)
        return None, None

    def random_for(self, category: str, item_id: str, length: str) -> tuple[str, str]:
        """A seeded persona from a domain other than the matched one (a built-in unrelated field if none)."""
        rng = random.Random(f"{self.seed}:{category}:{item_id}")
        matched = self.domain_for(category)
        pool = [d for d in self.personas if d != matched]
        if pool:
            dom = pool[rng.randrange(len(pool))]
            return self.text(dom, length, category)[0], dom
        field = RANDOM_FIELDS[rng.randrange(len(RANDOM_FIELDS))]
        return generic_persona(field, length), f"generic:{field}"


class EngineProvider:
    """Lazily builds (and caches) the engine of each system kind.

    ``factories`` maps ``"base"``, ``"lora"`` and ``"prism"`` to zero-argument callables; each engine is
    built once. ``persona``/``random`` use the base engine. ``identity(kind)`` names the weights behind
    a kind in cache keys.
    """

    def __init__(self, factories: dict[str, Callable[[], Any]], identities: dict[str, str]):
        self.factories = factories
        self.identities = identities
        self._engines: dict[str, Any] = {}
        self.closers: list[Callable[[], Any]] = []
        """Called by :meth:`close` (e.g. stopping a vLLM server the provider started)."""

    @staticmethod
    def engine_kind(kind: str) -> str:
        return "base" if kind in ("base", "persona", "random") else kind

    def get(self, kind: str):
        k = self.engine_kind(kind)
        if k not in self._engines:
            if k not in self.factories:
                raise PrismError(f"system '{kind}' needs --prism ARTIFACT (a trained PRISM model directory)")
            self._engines[k] = self.factories[k]()
        return self._engines[k]

    def identity(self, kind: str) -> str:
        return self.identities.get(self.engine_kind(kind), self.engine_kind(kind))

    def loaded(self) -> dict:
        return dict(self._engines)

    def close(self) -> None:
        """Release what the engines hold (a started vLLM server is stopped). Idempotent."""
        closers, self.closers = self.closers, []
        for close in closers:
            close()


def fixed_provider(engines: dict[str, Any]) -> EngineProvider:
    """An :class:`EngineProvider` over ready engines (tests, notebooks)."""
    return EngineProvider(
        {k: (lambda e=e: e) for k, e in engines.items()},
        {k: f"{k}:{getattr(e, 'model_name', '')}" for k, e in engines.items()},
    )
