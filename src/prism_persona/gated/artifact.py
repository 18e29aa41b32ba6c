"""The PRISM artifact directory (``RUN/prism/``): what is in it and how it is written.

* ``prism_config.json`` - base model (the embedded default by name, else its id or path), persona
  placement, library version, file names;
* ``gate.safetensors`` + ``gate_config.json`` - the routing gate and its threshold and metrics;
* ``adapter/`` - a standard PEFT LoRA adapter (decoder layers 1..L-1), loadable with
  ``PeftModel.from_pretrained(base, "RUN/prism/adapter")``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from .gate import GATE_CONFIG, GATE_WEIGHTS, GateBundle

PRISM_CONFIG = "prism_config.json"
ADAPTER_DIR = "adapter"


def model_reference(spec: Optional[str]) -> tuple[str, str]:
    """(what to store as ``base_model``, its kind): the embedded default by name, paths made absolute."""
    from ..models import resolve_model

    src = resolve_model(spec)
    if src.kind == "embedded":
        return src.display, "embedded"
    if src.kind == "gguf":
        return str(Path(src.path_or_id) / src.gguf_file), "gguf"
    return src.path_or_id, src.kind


def write_artifact(directory: str | Path, *, model_spec: Optional[str], gate: GateBundle,
                   adapter_dir: str | Path, extra: Optional[dict] = None) -> Path:
    """Assemble the artifact: gate files, a copy of the adapter dir and ``prism_config.json`` (last,
    so a directory with a config is complete)."""
    from .. import __version__

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    gate.save(d)
    src = Path(adapter_dir).resolve()
    dst = (d / ADAPTER_DIR).resolve()
    if src != dst:
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("optimizer.pt", "trainer_state.json"))
    base, kind = model_reference(model_spec)
    cfg = {"base_model": base, "model_kind": kind, "adapter": ADAPTER_DIR, "gate_weights": GATE_WEIGHTS,
           "gate_config": GATE_CONFIG, "threshold": gate.threshold, "prism_version": __version__}
    cfg.update(extra or {})
    (d / PRISM_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return d


def is_artifact(directory: str | Path) -> bool:
    d = Path(directory)
    return (d / PRISM_CONFIG).is_file() and (d / GATE_WEIGHTS).is_file()


def assemble(run, cfg) -> Path:
    """Build ``RUN/prism`` from the finished gate (``RUN/gate``) and distillation (``RUN/distill/adapter``)."""
    from ..errors import PrismError

    gate_dir, adapter = run.path("gate"), run.path("distill") / "adapter"
    if not (gate_dir / GATE_WEIGHTS).is_file():
        raise PrismError(f"{run.root} has no trained gate; run `prism gate --run {run.root}` first")
    if not (adapter / "adapter_config.json").is_file():
        raise PrismError(f"{run.root} has no distilled adapter; run `prism distill --run {run.root}` first")
    extra = {"domains": list(cfg.persona.domains), "placement": cfg.persona.placement,
             "persona_length": cfg.persona.use_length, "batch_size": int(cfg.model.batch_size),
             "distill": {"loss": cfg.distill.loss, "r": cfg.distill.r, "alpha": cfg.distill.alpha,
                         "target_modules": list(cfg.distill.target_modules)},
             "trust_remote_code": bool(cfg.model.trust_remote_code)}
    return write_artifact(run.path("prism"), model_spec=cfg.model.model, gate=GateBundle.load(gate_dir),
                          adapter_dir=adapter, extra=extra)
