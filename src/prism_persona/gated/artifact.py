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
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .gate import GATE_CONFIG, GATE_WEIGHTS, GateBundle

PRISM_CONFIG = "prism_config.json"
ADAPTER_DIR = "adapter"


@dataclass(frozen=True)
class Artifact:
    """A PRISM artifact directory, read and checked once: every reader goes through :meth:`read`.

    ``config`` is ``prism_config.json`` as written (unknown keys are kept: newer artifacts load).
    """

    path: Path
    config: dict

    @classmethod
    def read(cls, directory: str | Path, need_adapter: bool = True) -> "Artifact":
        """Check ``directory`` is a complete artifact; a one-line :class:`PrismError` otherwise.

        ``need_adapter=False`` for readers that only route (the gate is all they load).
        """
        from ..errors import PrismError

        d = Path(directory).expanduser().resolve()
        cfg_path = d / PRISM_CONFIG
        if not cfg_path.is_file():
            raise PrismError(f"{d} is not a PRISM artifact (no {PRISM_CONFIG}); point --prism at RUN/prism")
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise PrismError(f"{cfg_path} is not valid JSON ({exc}); re-assemble the artifact") from None
        if not isinstance(cfg, dict) or not cfg.get("base_model"):
            raise PrismError(f"{cfg_path} names no base_model; re-assemble the artifact")
        for name in (GATE_WEIGHTS, GATE_CONFIG):
            if not (d / name).is_file():
                raise PrismError(f"{d} has no {name}: the artifact is incomplete; re-assemble it")
        art = cls(d, cfg)
        if need_adapter and not (art.adapter_dir / "adapter_config.json").is_file():
            raise PrismError(f"{d} has no LoRA adapter ({art.adapter_dir}/adapter_config.json is missing); "
                             "re-assemble the artifact")
        return art

    @property
    def base_model(self) -> str:
        return str(self.config["base_model"])

    @property
    def adapter_dir(self) -> Path:
        return self.path / str(self.config.get("adapter", ADAPTER_DIR))

    @property
    def batch_size(self) -> int:
        return int(self.config.get("batch_size", 8))

    def gate(self) -> GateBundle:
        return GateBundle.load(self.path)


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
