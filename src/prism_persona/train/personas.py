"""One adapter per persona: the existing distillation (:func:`prism_persona.train.distill.run_distill`)
run once per persona, on that persona's winners only.

A run's personas are per domain (``persona.persona_files``: domain -> file; domains sharing a file share
a persona, a domain without one has its own). With one persona this is today's distillation
(``RUN/distill/adapter``). With K >= 2, persona ``name`` trains in its own sub-run
``RUN/distill/personas/<name>/`` (resumable and skipped when done, like the single distillation) and
``RUN/distill/personas.json`` lists them in order; :func:`prism_persona.gated.artifact.assemble` then
writes the artifact's PEFT multi-adapter directory (adapter k = persona k).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from ..config import RunConfig
from ..gated.artifact import PERSONA_ADAPTERS
from ..gated.layers import ADAPTER_NAME, DEFAULT_ADAPTER
from ..store import RunDir

log = logging.getLogger(__name__)

PERSONAS_DIR = "personas"  # under RUN/distill


def persona_name(text: str) -> str:
    """A folder / PEFT adapter name from a persona file's stem or a domain name."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-_")[:64].rstrip("-_")
    return name if ADAPTER_NAME.match(name) else "persona"


def persona_groups(cfg: RunConfig) -> dict[str, list[str]]:
    """``persona name -> its domains``, in the order of ``persona.domains`` (adapter k = k-th persona).
    Domains with the same persona file share a persona (named by the file's stem); a domain without
    one is its own persona (named by the domain)."""
    keys: dict[str, str] = {}  # identity (file path or domain) -> name
    groups: dict[str, list[str]] = {}
    from ..bootstrap.personas import persona_files, run_domains

    files = persona_files(cfg)
    for domain in run_domains(cfg):
        f = files.get(domain)
        key = f"file:{Path(f).expanduser().resolve()}" if f else f"domain:{domain}"
        if key not in keys:
            base = persona_name(Path(f).stem if f else domain)
            name, n = base, 2
            while name in groups or (groups and name == DEFAULT_ADAPTER):
                name, n = f"{base[:60]}-{n}", n + 1
            keys[key] = name
            groups[name] = []
        groups[keys[key]].append(domain)
    return groups


def distill_personas(
    run: RunDir,
    cfg: RunConfig,
    records: Sequence[dict],
    model=None,
    tokenizer=None,
    max_steps: Optional[int] = None,
) -> dict[str, dict]:
    """Distil one adapter per persona from that persona's records (its domains' queries; the winners
    are its training set, as in :func:`run_distill`). ``persona name -> run_distill's summary``.

    One persona: ``run_distill`` on the run itself (``RUN/distill/adapter``, exactly today's stage).
    Several: each in ``RUN/distill/personas/<name>/`` and ``RUN/distill/personas.json`` naming them."""
    from ..models import load_model
    from .distill import STAGE, run_distill
    from .parallel import DataParallel

    groups = persona_groups(cfg)
    if len(groups) <= 1:
        return {name: run_distill(run, cfg, records, model, tokenizer, max_steps) for name in groups}
    if model is None:
        device = DataParallel().device(cfg.model.device)
        model, tokenizer = load_model(cfg.model.model, cfg.model.dtype, device, cfg.model.trust_remote_code)
    out, listing = {}, []
    for name, domains in groups.items():
        mine = [r for r in records if r.get("domain") in domains]
        log.info("distill: persona %s (%s): %d records", name, ", ".join(domains), len(mine))
        sub = RunDir(run.path(STAGE) / PERSONAS_DIR / name)
        out[name] = run_distill(sub, cfg, mine, model, tokenizer, max_steps)
        adapter = sub.path(STAGE) / "adapter"
        listing.append({"name": name, "domains": domains, "adapter": str(adapter.relative_to(run.root))})
    run.write_json(PERSONA_ADAPTERS, {"personas": listing})
    return out
