"""Shared pieces of the benchmark scripts: arguments, models, random LoRA + gate, timing, recording.

Every script measures all the variants it compares in one run, on one machine, and appends one
record to ``benchmarks/results/results.jsonl`` (machine, versions, date, settings, numbers);
``benchmarks/report.py`` renders ``RESULTS.md`` from that file.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "results.jsonl"
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GATE_HIDDEN = (128, 64)

# Qwen2.5-7B-Instruct's shape (its config.json); weights are random: decode speed does not depend on them.
QWEN7B = dict(
    hidden_size=3584,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    intermediate_size=18944,
    vocab_size=152064,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    hidden_act="silu",
)
# SmolLM2-135M-Instruct's shape (the embedded model's architecture), for random weights of its size.
SMOLLM2 = dict(
    hidden_size=576,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    intermediate_size=1536,
    vocab_size=49152,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    hidden_act="silu",
)


# --------------------------------------------------------------------------------------------------
# arguments


def base_parser(
    description: str, batch_sizes: str = "1,16,64", prompt_len: int = 256, new_tokens: int = 128, repeats: int = 3
) -> argparse.ArgumentParser:
    """The options every script shares."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument(
        "--size",
        default="tiny",
        choices=["tiny", "embedded", "smol", "7b"],
        help="tiny: random 4-layer model; embedded: SmolLM2-135M; smol: random SmolLM2-135M shape; "
        "7b: random Qwen2.5-7B shape (GPU)",
    )
    p.add_argument("--batch-sizes", default=batch_sizes, help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=prompt_len, help="prompt tokens per row")
    p.add_argument("--new-tokens", type=int, default=new_tokens, help="generated tokens per row (forced)")
    p.add_argument("--repeats", type=int, default=repeats, help="timed repeats per variant (median reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op CPU threads (0 = torch's default); 1 is steadier on a shared CPU",
    )
    p.add_argument("--out", default=str(RESULTS), help="results file to append to ('' = do not record)")
    return p


def batch_sizes(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


# --------------------------------------------------------------------------------------------------
# machine and records


def machine_info() -> dict:
    """CPU model, cores, memory, GPU name."""
    import torch

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)  # other work on a shared machine
    except OSError:
        pass
    try:
        import psutil

        info["ram_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
        info["affinity_cores"] = len(psutil.Process().cpu_affinity())
    except Exception:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_mem_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    else:
        info["gpu"] = None
    return info


def versions() -> dict:
    import peft
    import torch
    import transformers

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    try:
        from prism_persona import __version__

        out["prism_persona"] = __version__
    except Exception:
        pass
    return out


def record(out: str | Path | None, bench: str, settings: dict, rows: list[dict], extra: Optional[dict] = None) -> dict:
    """Append one run to the results file (JSONL) and return the record."""
    rec = {
        "bench": bench,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine_info(),
        "versions": versions(),
        "settings": settings,
        "rows": rows,
    }
    if extra:
        rec.update(extra)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec, sort_keys=True) + "\n")
    return rec


def fmt(value: Any) -> str:
    """Numbers to 3 significant-ish digits; others as text."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def table(rows: Sequence[dict], cols: Sequence[str]) -> str:
    """A GitHub-flavoured markdown table of ``rows`` restricted to ``cols``."""
    head = "| " + " | ".join(cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join([head, sep, *body])


# --------------------------------------------------------------------------------------------------
# devices, timing


def pick(device: str, dtype: str, threads: int = 0):
    """(device string, torch dtype) with PRISM's rules for ``auto``; sets the CPU threads if given."""
    import torch

    from prism_persona.models import pick_device, pick_dtype

    if threads and threads > 0:
        torch.set_num_threads(int(threads))

    dev = pick_device(device)
    return dev, pick_dtype(dtype, dev)


def setup(args, *recorded: str) -> tuple[Built, list[int], dict]:
    """What a model benchmark's ``main`` starts with, from :func:`base_parser`'s arguments: the model
    built on the picked device and dtype, the batch sizes, and the settings every record names, plus the
    arguments named in ``recorded`` (each benchmark adds its own others)."""
    dev, dtype = pick(args.device, args.dtype, args.threads)
    built = build_model(args.size, dev, dtype, seed=args.seed)
    sizes = batch_sizes(args.batch_sizes)
    settings = {
        "size": args.size,
        "model": built.label,
        "device": dev,
        "dtype": str(dtype),
        "batch_sizes": sizes,
        "repeats": args.repeats,
        **{name: getattr(args, name) for name in recorded},
    }
    return built, sizes, settings


def sync(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str, repeats: int = 3, warmup: int = 1) -> tuple[float, Any]:
    """(median seconds over ``repeats`` runs after ``warmup`` runs, the last result)."""
    result = None
    for _ in range(max(0, warmup)):
        result = fn()
    sync(device)
    times = []
    for _ in range(max(1, repeats)):
        sync(device)
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


# --------------------------------------------------------------------------------------------------
# models


@dataclass
class Built:
    """A benchmark model: the causal LM, its tokenizer (or None for random shapes), and a label."""

    model: Any
    tokenizer: Any
    label: str
    device: str
    dtype: Any
    tmpdir: Optional[Any] = field(default=None, repr=False)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def hidden(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def vocab(self) -> int:
        return int(self.model.config.vocab_size)


def qwen7b_config():
    """The Qwen2.5-7B-Instruct architecture as a ``Qwen2Config`` (no download)."""
    from transformers import Qwen2Config

    return Qwen2Config(**QWEN7B, pad_token_id=151643, eos_token_id=151645, bos_token_id=151643)


def build_model(size: str, device: str, dtype, seed: int = 0) -> Built:
    """``tiny`` (random 4-layer Llama, hidden 64), ``embedded`` (SmolLM2-135M), ``smol`` (random SmolLM2-135M
    shape), ``7b`` (random Qwen2.5-7B)."""
    import torch

    from prism_persona.models import load_model

    if size == "tiny":
        from prism_persona.testing import make_tiny_model

        tmp = tempfile.TemporaryDirectory(prefix="prism-bench-")
        path = make_tiny_model(Path(tmp.name) / "tiny", num_layers=4, hidden_size=64, seed=seed)
        model, tok = load_model(str(path), dtype=_dtype_name(dtype), device=device)
        return Built(model, tok, "tiny-random-llama-4L-64h", device, dtype, tmp)
    if size == "embedded":
        model, tok = load_model(None, dtype=_dtype_name(dtype), device=device)
        return Built(model, tok, "SmolLM2-135M-Instruct (embedded)", device, dtype)
    if size == "smol":
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(
                LlamaConfig(**SMOLLM2, pad_token_id=2, eos_token_id=2), dtype=dtype
            )
        model.eval()
        return Built(model, None, "random SmolLM2-135M shape", device, dtype)
    if size == "7b":
        from transformers import AutoModelForCausalLM

        if not device.startswith("cuda"):
            raise SystemExit("--size 7b builds ~15 GB of random bf16 weights on the GPU; use --device cuda")
        torch.manual_seed(seed)
        cfg = qwen7b_config()
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        model.eval()
        model.generation_config.pad_token_id = cfg.pad_token_id
        return Built(model, None, "random Qwen2.5-7B-Instruct shape", device, dtype)
    raise SystemExit(f"unknown --size {size}")


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def random_prompts(built: Built, batch: int, prompt_len: int, seed: int = 0, ragged: bool = False):
    """Random token prompts ``(input_ids, attention_mask)``; ``ragged`` left-pads rows to varied lengths."""
    import torch

    g = torch.Generator().manual_seed(seed)
    low = 3 if built.vocab > 300 else 0
    ids = torch.randint(low, min(built.vocab, 32000) - 1, (batch, prompt_len), generator=g)
    mask = torch.ones(batch, prompt_len, dtype=torch.long)
    if ragged and prompt_len > 2:
        pad_id = int(built.model.generation_config.pad_token_id or 0)
        for row in range(batch):
            n_pad = (row * 3) % max(1, prompt_len // 2)
            ids[row, :n_pad] = pad_id
            mask[row, :n_pad] = 0
    return ids.to(built.device), mask.to(built.device)


def add_random_lora(
    model, r: int = 16, alpha: int = 32, seed: int = 0, scale: float = 1.0, adapter_name: str = "default"
):
    """Wrap ``model`` in a PEFT LoRA on every attention+MLP projection of layers 1..L-1, random A and B.

    PEFT's default init makes B zero (a no-op adapter); random B makes the adapter change the output,
    so the correctness checks compare real differences. The injection happens in place.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    L = int(model.config.num_hidden_layers)
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=list(TARGET_MODULES),
        layers_to_transform=list(range(1, L)),
        init_lora_weights=False,
        bias="none",
    )
    torch.manual_seed(seed)
    pm = get_peft_model(model, cfg, adapter_name=adapter_name)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, scale / (p.shape[1] ** 0.5))
    pm.eval()
    return pm


def make_random_gate(hidden: int, device: str, dtype, seed: int = 0, sizes: Sequence[int] = GATE_HIDDEN):
    """A random gate MLP ``hidden -> 128 -> 64 -> 1`` (GELU): the paper's gate shape and the costlier one
    (PRISM's default, ``gate.hidden_sizes = []``, is a logistic regression ``hidden -> 1``)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers: list = []
    width = hidden
    for h in sizes:
        layers += [nn.Linear(width, h), nn.GELU()]
        width = h
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers).to(device=device, dtype=dtype).eval()


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_param_count(
    cfg, r: int = 16, layers: Optional[Sequence[int]] = None, modules: Sequence[str] = TARGET_MODULES
) -> int:
    """LoRA parameters by hand: ``r * (in + out)`` per adapted projection per layer."""
    h = int(cfg.hidden_size)
    heads = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    hd = int(getattr(cfg, "head_dim", None) or h // heads)
    inter = int(cfg.intermediate_size)
    shapes = {
        "q_proj": (h, heads * hd),
        "k_proj": (h, kv * hd),
        "v_proj": (h, kv * hd),
        "o_proj": (heads * hd, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }
    L = int(cfg.num_hidden_layers)
    n_layers = len(layers) if layers is not None else L - 1
    return n_layers * sum(r * (shapes[m][0] + shapes[m][1]) for m in modules)


def gate_param_count(hidden: int, sizes: Sequence[int] = GATE_HIDDEN, standardise: bool = True) -> int:
    """Gate numbers by hand: MLP weights + biases, plus the input standardisation (mean, std buffers)
    that PRISM's gate keeps."""
    total, width = (2 * hidden if standardise else 0), hidden
    for h in list(sizes) + [1]:
        total += width * h + h
        width = h
    return total


def print_header(title: str, built: Built, settings: dict) -> None:
    import torch

    m = machine_info()
    print(f"# {title}")
    print(
        f"model: {built.label} | device: {built.device} ({m.get('gpu') or m['cpu']}, {m['cores']} cores) | "
        f"dtype: {_dtype_name(built.dtype)} | torch {torch.__version__}"
    )
    print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    sys.stdout.flush()
