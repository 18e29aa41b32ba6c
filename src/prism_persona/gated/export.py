"""``prism export --format vllm``: the PRISM artifact as files vLLM (``--enable-lora``) loads.

PRISM's adapter covers decoder layers 1..L-1 (``layers_to_transform``), which vLLM does not apply
reliably. The export therefore writes a plain PEFT LoRA adapter over all layers, with explicit
*zero* A/B weights on the layers the original leaves alone (layer 0): ``B @ A = 0`` there, so the
maths is identical, and ``layers_to_transform`` / ``layers_pattern`` are dropped. The gate files and
``prism_config.json`` are copied beside it, so ``prism serve --route-only --prism OUT`` can route, and a
``README.md`` holds the exact vLLM and router commands.

Layout of ``OUT``::

    OUT/adapter/adapter_config.json, adapter_model.safetensors   # --lora-modules prism=OUT/adapter
    OUT/gate.safetensors, gate_config.json, prism_config.json     # for prism serve --route-only
    OUT/README.md

An artifact with one adapter per persona exports each of them the same way, in the artifact's layout:
the first persona in ``OUT/adapter``, persona ``name`` in ``OUT/adapter/<name>`` (``--lora-modules
<name>=OUT/adapter/<name>``, one per persona).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from ..errors import PrismError

log = logging.getLogger(__name__)

FORMATS = ("vllm",)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
EMBEDDED_HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_LAYER = re.compile(r"\.(layers|h|blocks)\.(\d+)\.")
_DROP_KEYS = ("layers_to_transform", "layers_pattern")


def export(artifact: str | Path, out: str | Path, fmt: str = "vllm", overwrite: bool = False) -> Path:
    """Export the artifact dir ``artifact`` (``RUN/prism``) to ``out`` in format ``fmt``."""
    if fmt not in FORMATS:
        raise PrismError(f"unknown export format '{fmt}'; choose one of: {', '.join(FORMATS)}")
    return export_vllm(artifact, out, overwrite=overwrite)


def _load_weights(adapter: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    st = adapter / "adapter_model.safetensors"
    if st.is_file():
        return load_file(str(st))
    binary = adapter / "adapter_model.bin"
    if binary.is_file():
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise PrismError(f"{adapter} holds no adapter weights (adapter_model.safetensors)")


def fill_missing_layers(weights: dict) -> tuple[dict, list[int]]:
    """Add zero LoRA weights for every decoder layer below the highest one that has none (layer 0
    for PRISM), with the shapes the same module has on the other layers. Returns (weights, filled)."""
    import torch

    by_layer: dict[int, set] = {}
    template: dict[str, tuple] = {}  # key with the layer index replaced by {} -> (shape, dtype)
    for key, value in weights.items():
        m = _LAYER.search(key)
        if m is None or ".lora_" not in key:
            continue
        layer = int(m.group(2))
        pattern = key[: m.start(2)] + "{}" + key[m.end(2) :]
        by_layer.setdefault(layer, set()).add(pattern)
        template.setdefault(pattern, (tuple(value.shape), value.dtype))
    if not by_layer:
        raise PrismError("the adapter has no per-layer LoRA weights to export")
    out = dict(weights)
    filled = []
    for layer in range(0, max(by_layer) + 1):
        missing = [p for p in template if p not in by_layer.get(layer, set())]
        if missing:
            filled.append(layer)
        for pattern in missing:
            shape, dtype = template[pattern]
            out[pattern.format(layer)] = torch.zeros(shape, dtype=dtype)
    return out, filled


def target_module_names(weights: dict) -> list[str]:
    """Leaf module names carrying LoRA weights, e.g. ``['down_proj', 'q_proj', ...]``."""
    names = set()
    for key in weights:
        if ".lora_" in key:
            names.add(key.split(".lora_")[0].rsplit(".", 1)[-1])
    return sorted(names)


def vllm_adapter_config(cfg: dict, weights: dict, base_model: str) -> dict:
    """The adapter config vLLM accepts: all layers, explicit target modules, no DoRA."""
    if cfg.get("use_dora"):
        raise PrismError("the adapter uses DoRA, which vLLM does not serve")
    if cfg.get("modules_to_save"):
        raise PrismError(f"the adapter has modules_to_save={cfg['modules_to_save']}, which vLLM does not serve")
    new = {k: v for k, v in cfg.items() if k not in _DROP_KEYS}
    new["target_modules"] = target_module_names(weights)
    new["base_model_name_or_path"] = base_model
    new["inference_mode"] = True
    return new


def vllm_base_model(prism_cfg: dict) -> str:
    """The name to give ``vllm serve``: the HF id of the embedded default, else the stored base model."""
    if prism_cfg.get("model_kind") == "embedded":
        return EMBEDDED_HF_ID
    return str(prism_cfg.get("base_model", "BASE_MODEL"))


def vllm_max_lora_rank(r: int) -> int:
    return next((v for v in VLLM_LORA_RANKS if v >= r), r)


def export_vllm(artifact: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``out/adapter`` (PEFT, zero weights on layer 0; one per persona), the gate files and a README."""
    from safetensors.torch import save_file

    from .artifact import PRISM_CONFIG, Artifact
    from .gate import GATE_CONFIG, GATE_WEIGHTS

    art, dst = Path(artifact).expanduser(), Path(out).expanduser()
    read = Artifact.read(art)
    prism_cfg = read.config
    if dst.resolve() == art.resolve():
        raise PrismError("the export directory must differ from the artifact directory")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise PrismError(f"{dst} exists and is not empty; choose another directory or pass --overwrite")
    base = vllm_base_model(prism_cfg)
    converted = []  # (name, relative dir, weights, config) per persona, all checked before anything is written
    filled_layers: set[int] = set()
    for k, (name, adapter) in enumerate(read.adapters):
        adapter_cfg = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
        weights, filled_k = fill_missing_layers(_load_weights(adapter))
        filled_layers.update(filled_k)
        converted.append(
            (
                name,
                Path("adapter", name) if k else Path("adapter"),
                weights,
                vllm_adapter_config(adapter_cfg, weights, base),
            )
        )

    out_adapter = dst / "adapter"
    if out_adapter.exists():
        shutil.rmtree(out_adapter)
    for _, rel, weights, new_cfg in converted:
        (dst / rel).mkdir(parents=True)  # the first persona's adapter/ comes first
        save_file(
            {k: v.contiguous() for k, v in weights.items()},
            str(dst / rel / "adapter_model.safetensors"),
            metadata={"format": "pt"},
        )
        (dst / rel / "adapter_config.json").write_text(
            json.dumps(new_cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
    filled = sorted(filled_layers)
    for name in (GATE_WEIGHTS, GATE_CONFIG):
        if (art / name).is_file():
            shutil.copy2(art / name, dst / name)
    (dst / PRISM_CONFIG).write_text(
        json.dumps({**prism_cfg, "exported_for": "vllm", "zero_lora_layers": filled}, indent=2, sort_keys=True) + "\n",
        encoding="utf-8",
    )
    r = max(int(c.get("r", 16)) for *_, c in converted)
    modules = [(name, rel) for name, rel, *_ in converted] if len(converted) > 1 else None
    (dst / "README.md").write_text(readme(dst, base, r, prism_cfg, modules=modules), encoding="utf-8")
    log.info("exported %s -> %s (zero LoRA weights written for layers %s)", art, dst, filled)
    return dst


def readme(dst: Path, base: str, r: int, prism_cfg: dict, port: int = 8001, modules=None) -> str:
    """The README snippet written next to the export; ``modules`` = ``[(persona, relative dir), ...]`` of
    an artifact with one adapter per persona."""
    lora = f"--lora-modules prism={dst.resolve() / 'adapter'}"
    personas = ""
    if modules:
        lora = f"--max-loras {len(modules)} --lora-modules " + " ".join(
            f"{n}={dst.resolve() / rel}" for n, rel in modules
        )
        personas = (
            f"\nOne adapter per persona ({', '.join(n for n, _ in modules)}), each served under its name. "
            "`prism serve --route-only` below sends each routed request to its persona's adapter by that name "
            "(`--lora-name` is required but only a one-adapter artifact uses it).\n"
        )
    note = ""
    if prism_cfg.get("model_kind") in ("embedded", "gguf"):
        note = (
            f"\nNote: PRISM was trained on `{prism_cfg.get('base_model')}` (GGUF weights, dequantised). vLLM "
            f"serves `{base}`; its full-precision weights differ slightly from the quantised ones the LoRA "
            "was distilled on.\n"
        )
    return f"""# PRISM adapter exported for vLLM

`adapter/` is a standard PEFT LoRA adapter. PRISM's LoRA covers decoder layers 1..L-1; layer 0 carries
explicit zero weights here (identical maths), because vLLM cannot be told to skip a layer.
{note}{personas}
## 1. Serve the base model with the adapter (vLLM)

```bash
vllm serve {base} --enable-lora --max-lora-rank {vllm_max_lora_rank(r)} \\
    {lora} --port {port}
```

## 2. Route each request with the PRISM gate (layer 0 only, runs on CPU)

```bash
prism serve --route-only --prism {dst.resolve()} \\
    --upstream http://127.0.0.1:{port}/v1 --base-name {base} --lora-name {modules[0][0] if modules else "prism"} --port 8000
```

Clients talk to `http://127.0.0.1:8000/v1` with any OpenAI client; each response carries
`prism: {{"routed", "gate_prob", "persona", "persona_prob"}}` and the headers `X-Prism-Routed` /
`X-Prism-Gate-Prob` (`X-Prism-Persona` / `X-Prism-Persona-Prob` where a named persona answered).
"""
