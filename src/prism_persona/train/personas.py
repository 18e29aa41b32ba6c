"""One adapter per persona: the existing distillation (:func:`prism_persona.train.distill.run_distill`)
run once per persona, on that persona's winners only.

A run's personas are its distinct persona texts (:func:`personas_of_run`: domains whose persona text is
the same share a persona, from a file or generated), named by the persona file's stem or the domain; the
gate's classes and the adapters are one list (:func:`routed_personas`: ``gate.classes = personas``, the
personas that won somewhere, at least two). With one persona this is today's distillation
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


def run_personas(domains: Sequence[str], texts: dict, files: Optional[dict] = None) -> list[dict]:
    """The run's distinct personas, in the order of ``domains``: ``{"name", "key", "domains"}`` each. A
    persona is its text (``texts``: domain -> the persona text that drove the run; a domain without one is
    left out); domains with the same text share one, whether the text came from a file or was generated.
    ``name`` (a folder and PEFT adapter name, :func:`persona_name`): the persona file's stem when the
    first domain of the persona has one (``files``: domain -> path), else that domain; a name already
    taken gets ``-2``, ``-3`` ..., and only the first persona may be called ``default`` (PEFT's root
    adapter). The one identity of the gate's classes and the distilled adapters (persona k = adapter k)."""
    from ..store import content_key

    out: list[dict] = []
    by_key: dict = {}
    for d in domains:
        text = texts.get(d)
        if text is None:
            continue
        key = content_key("persona", str(text).strip())
        if key not in by_key:
            base = persona_name(Path(files[d]).stem if files and files.get(d) else d)
            taken = {p["name"] for p in out}
            name, n = base, 2
            while name in taken or (out and name == DEFAULT_ADAPTER):
                name, n = f"{base[:60]}-{n}", n + 1
            by_key[key] = {"name": name, "key": key, "domains": []}
            out.append(by_key[key])
        by_key[key]["domains"].append(d)
    return out


def personas_of_run(run, cfg: RunConfig, records: Sequence[dict] = ()) -> list[dict]:
    """:func:`run_personas` of a run directory: the persona texts of ``RUN/personas.jsonl`` at the run's
    persona length (the texts that drove the run, from files or generated), for the run's domains (in
    ``persona.domains`` order) and any other domain of ``records`` (sorted, after them). A domain without
    a persona text gives ``[]`` (one persona for all: the binary gate, one adapter), with a log line:
    several personas are never guessed."""
    from ..bootstrap.personas import load_personas, persona_files, run_domains, shown

    stored = load_personas(run)
    files = persona_files(cfg)
    run_ds = run_domains(cfg)
    used = {r.get("domain", "") for r in records}
    domains = run_ds + sorted(used - set(run_ds))
    use_length = shown(cfg)[0]
    texts = {}
    for d in domains:
        by_length = stored.get(d) or {}
        texts[d] = by_length.get(use_length) or next(iter(by_length.values()), None)
    missing = [d for d in domains if not texts[d]]
    if missing:
        log.info("no persona text for %s in personas.jsonl: one persona for all domains", ", ".join(missing))
        return []
    return run_personas(domains, texts, files)


def has_winner(record: dict) -> bool:
    """Whether the persona won on this record (its label, or any of its answer samples' labels)."""
    return int(record.get("label", 0)) == 1 or any(int(s.get("label", 0)) == 1 for s in record.get("samples") or ())


def routed_personas(run, cfg: RunConfig, records: Sequence[dict]) -> list[dict]:
    """The personas a run trains one gate class and one adapter each for: :func:`personas_of_run` with
    ``gate.classes = personas``, less every persona that won on none of ``records`` (it gets no adapter
    and no gate class: its queries are base rows of the gate, never routed). Fewer than two left:
    ``[]``, the binary gate and one adapter (today's run)."""
    from .gate import kway_classes

    if not kway_classes(cfg):
        return []
    personas = personas_of_run(run, cfg, records)
    if len(personas) < 2:
        return []
    won = {r.get("domain", "") for r in records if has_winner(r)}
    kept = [p for p in personas if won & set(p["domains"])]
    for p in personas:
        if p not in kept:
            log.warning(
                "persona %s won on no query of %s: no adapter, never routed", p["name"], ", ".join(p["domains"])
            )
    return kept if len(kept) >= 2 else []


def persona_groups(run, cfg: RunConfig, records: Sequence[dict]) -> dict[str, list[str]]:
    """``persona name -> its domains`` for the adapters :func:`distill_personas` trains, in order
    (adapter k = the gate's persona k: :func:`routed_personas`, the list the gate trains on); one entry
    (all the records' domains, named by the first persona) when the run distils one adapter."""
    personas = routed_personas(run, cfg, records)
    if personas:
        return {p["name"]: list(p["domains"]) for p in personas}
    every = personas_of_run(run, cfg, records)
    return {every[0]["name"] if every else "default": sorted({r.get("domain", "") for r in records})}


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
    import time

    from ..models import load_model
    from .distill import STAGE, run_distill
    from .parallel import DataParallel

    groups = persona_groups(run, cfg, records)
    if len(groups) <= 1:
        return {name: run_distill(run, cfg, records, model, tokenizer, max_steps) for name in groups}
    if run.done(STAGE):
        log.info("distill: already done, skipping (pass --redo distill to train it again)")
        done = run.read_json(f"{STAGE}.done.json").get("personas") or []
        return {str(p.get("name")): {k: v for k, v in p.items() if k != "name"} for p in done}
    t0 = time.perf_counter()
    if model is None:
        device = DataParallel().device(cfg.model.device)
        model, tokenizer = load_model(cfg.model.model, cfg.model.dtype, device, cfg.model.trust_remote_code)
    out, listing = {}, []
    for name, domains in groups.items():
        mine = [r for r in records if r.get("domain") in domains]
        log.info("distill: persona %s (%s): %d records", name, ", ".join(domains), len(mine))
        sub = RunDir(run.path(STAGE) / PERSONAS_DIR / name)
        out[name] = run_distill(sub, cfg, mine, model, tokenizer, max_steps)  # skipped when that persona is done
        adapter = sub.path(STAGE) / "adapter"
        listing.append({"name": name, "domains": domains, "adapter": str(adapter.relative_to(run.root))})
    if not DataParallel().is_main:
        return out
    run.write_json(PERSONA_ADAPTERS, {"personas": listing})
    first = next(iter(out.values()))
    run.mark_done(
        STAGE,
        {
            "personas": [{"name": name, **info} for name, info in out.items()],  # in adapter order
            "examples": sum(int(i.get("examples") or 0) for i in out.values()),
            "steps": sum(int(i.get("steps") or 0) for i in out.values()),
            "loss": first.get("loss"),
            "first_loss": None,  # one curve per persona: RUN/distill/personas/<name>/distill/loss.png
            "last_loss": None,
            "seconds": round(time.perf_counter() - t0, 2),
        },
    )
    return out
