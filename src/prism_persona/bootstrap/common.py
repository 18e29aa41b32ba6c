"""Helpers shared by the bootstrap stages: seeds, the settings each stage's records depend on,
lazily created engines, chunking and token accounting."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Optional

from ..config import MAX_TEXT_CHARS, RunConfig
from ..errors import PrismError
from ..store import content_key
from . import prompts


def derive_seed(base: int, *parts: Any) -> int:
    """A 31-bit seed from the run seed and any JSON-serialisable parts (stable across runs)."""
    return int(content_key("seed", int(base), *parts), 16) % (2**31 - 1)


def chunks(items: list, size: int) -> Iterator[list]:
    size = max(1, int(size))
    for i in range(0, len(items), size):
        yield items[i : i + size]


def persona_file_text(path: str, domain: str) -> str:
    """Read a ``--persona-file``; a clear one-line error when missing or empty."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise PrismError(f"persona file for '{domain}' not found: {path}")
    try:
        text = p.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise PrismError(f"cannot read persona file for '{domain}' ({path}): {exc}") from None
    if not text:
        raise PrismError(f"persona file for '{domain}' is empty: {path}")
    if len(text) > MAX_TEXT_CHARS:
        raise PrismError(
            f"persona file for '{domain}' ({path}) has {len(text)} characters; a persona may have at most {MAX_TEXT_CHARS}"
        )
    return text


def persona_files_from_flags(items) -> dict:
    """``{domain: absolute path}`` from ``--persona-file DOMAIN=PATH`` values (one-line errors)."""
    files = {}
    for item in items:
        if "=" not in item:
            raise PrismError(f"--persona-file wants DOMAIN=PATH, got '{item}'")
        dom, path = item.split("=", 1)
        if not Path(path).expanduser().is_file():
            raise PrismError(f"persona file not found: {path}")
        if dom.strip() in files:
            raise PrismError(f"--persona-file names domain '{dom.strip()}' twice; give one file per domain")
        files[dom.strip()] = str(Path(path).expanduser().resolve())
    return files


def query_prompt_version(fmt: str = "list") -> str:
    """A short hash of the query-writing prompt of format ``fmt``: records written with another prompt
    are not mixed in."""
    if fmt == "shots":
        text = prompts.shots_prompt_text()
    else:
        text = prompts.QUERY_PROMPT if fmt == "list" else prompts.request_prompt_text()
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def stage_settings(cfg: RunConfig, stage: str) -> dict:
    """Everything the records of ``stage`` depend on, upstream stages included: the stage's own
    ``<stage>_settings(cfg)``, found through the stage registry (:data:`prism_persona.stages.STAGES`;
    each stage module owns its settings and extends its upstream stage's).

    Deliberately absent in every stage: the domain list, ``queries_per_persona`` and ``answers.samples``
    (records are keyed per domain / query / sample, so adding domains, queries or samples extends a run
    instead of invalidating it), batch sizes, devices, the engine kind and quiet mode.
    """
    from ..stages import get_stage

    return get_stage(stage).function("settings")(cfg)


class Lazy:
    """Build an object on first use (so a finished run resumes without loading the model)."""

    def __init__(self, factory: Callable[[], Any], value: Any = None):
        self._factory = factory
        self._value = value

    def __call__(self) -> Any:
        if self._value is None:
            self._value = self._factory()
        return self._value

    @property
    def built(self) -> Optional[Any]:
        return self._value


def counters(engines: Iterable[Any]) -> dict:
    """``{id(engine): (tokens_generated, generate_seconds)}`` of engines that count them."""
    return {
        id(e): (int(getattr(e, "tokens_generated", 0) or 0), float(getattr(e, "generate_seconds", 0.0) or 0.0))
        for e in engines
        if e is not None
    }


def token_stats(engines: Iterable[Any], baseline: Optional[dict] = None) -> dict:
    """Tokens generated and generation seconds summed over engines, minus what ``baseline``
    (from :func:`counters`, taken earlier) already held."""
    toks, secs = 0, 0.0
    for key, (t, s) in counters(engines).items():
        t0, s0 = (baseline or {}).get(key, (0, 0.0))
        toks += t - t0
        secs += s - s0
    return {
        "tokens_generated": toks,
        "generate_seconds": round(secs, 3),
        "tokens_per_s": round(toks / secs, 2) if secs > 0 else None,
    }
