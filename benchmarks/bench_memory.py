"""Benchmark 3: memory. Extra bytes of adapter + gate against the base weights, and peak memory per row.

Accounting (exact, no GPU needed): the base model's parameters, the LoRA parameters (r=16 on
q,k,v,o,gate,up,down of layers 1..L-1) counted both from the PEFT-injected model and by hand
(``r * (in + out)`` per projection), and the gate MLP (``hidden -> 128 -> 64 -> 1``). For ``--size 7b``
on a machine without a GPU the model is built on the ``meta`` device: counting only, no weights.

Peak per row (one mixed-batch generation per batch size): on CUDA ``max_memory_allocated`` minus the
memory held before the call, divided by the batch; on CPU the process RSS sampled during the call
(peak minus before; allocator caching makes this a rough figure) and the KV cache's exact size.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import gated_adapter  # noqa: E402


def dtype_bytes(dtype) -> int:
    import torch

    return torch.tensor([], dtype=dtype).element_size()


def accounting(model, r: int = 16, dtype_size: int = 2) -> dict:
    """Parameter counts and bytes of base, LoRA and gate; LoRA counted by PEFT and by hand."""
    cfg = model.config
    L = int(cfg.num_hidden_layers)
    base = common.count_params(model)
    lora_hand = common.lora_param_count(cfg, r=r, layers=range(1, L))
    gate_hand = common.gate_param_count(int(cfg.hidden_size))
    pm = common.add_random_lora(model, r=r, alpha=2 * r) if not _on_meta(model) else _meta_lora(model, r)
    lora_peft = sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)
    gate_module = gate_numel(int(cfg.hidden_size))
    extra = lora_hand + gate_hand
    return {
        "base_params": base,
        "lora_params_hand": lora_hand,
        "lora_params_peft": lora_peft,
        "gate_params_hand": gate_hand,
        "gate_params_module": gate_module,
        "extra_params": extra,
        "extra_share_of_base": extra / base,
        "base_bytes": base * dtype_size,
        "extra_bytes": extra * dtype_size,
        "lora_share_of_base": lora_hand / base,
        "gate_share_of_base": gate_hand / base,
        "bytes_per_param": dtype_size,
        "_peft_model": pm,
    }


def gate_numel(hidden: int) -> int:
    """Parameters + buffers of PRISM's gate module (``gate.Gate``) as built by the library."""
    import torch

    from prism_persona.gated.gate import Gate

    with torch.device("meta"):
        gate = Gate(hidden, list(common.GATE_HIDDEN), dropout=0.0, pooling="last")
    return sum(t.numel() for t in list(gate.parameters()) + list(gate.buffers()))


def _on_meta(model) -> bool:
    return next(model.parameters()).device.type == "meta"


def _meta_lora(model, r: int):
    """PEFT injection on a meta-device model (shapes only)."""
    from peft import LoraConfig, get_peft_model

    L = int(model.config.num_hidden_layers)
    cfg = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=list(common.TARGET_MODULES),
        layers_to_transform=list(range(1, L)),
        init_lora_weights=False,
    )
    return get_peft_model(model, cfg)


def meta_model(size: str):
    """The architecture on the meta device (no memory): for exact counting without weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if size == "7b":
        cfg = common.qwen7b_config()
    elif size == "embedded":
        from prism_persona.models import resolve_model

        src = resolve_model(None)
        cfg = AutoConfig.from_pretrained(src.path_or_id, gguf_file=src.gguf_file)
    else:
        raise SystemExit("meta_model: tiny is built for real")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def kv_bytes_per_row(cfg, tokens: int, dtype_size: int) -> int:
    """The KV cache of one row: 2 (K and V) x layers x KV heads x head dim x tokens x bytes."""
    heads = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    hd = int(getattr(cfg, "head_dim", None) or int(cfg.hidden_size) // heads)
    return 2 * int(cfg.num_hidden_layers) * kv * hd * tokens * dtype_size


class RssPeak:
    """Samples this process's RSS every few milliseconds in a thread; ``peak`` after ``stop``."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.before = self.proc.memory_info().rss
        self.peak = self.before
        self._run = True
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self) -> None:
        while self._run:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def stop(self) -> int:
        self._run = False
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        return self.peak - self.before


def peak_rows(
    run, name: str, built: common.Built, sizes: list[int], prompt_len: int, new_tokens: int, seed: int = 0
) -> list:
    """Peak extra memory of one mixed-batch generation ``run(ids, mask, routes, settings)``, per row."""
    import gc

    import torch
    from bench_generation import routes_for, settings_for

    settings = settings_for(built, new_tokens)
    dsize = dtype_bytes(built.dtype)
    rows = []
    for b in sizes:
        ids, mask = common.random_prompts(built, b, prompt_len, seed=seed + b)
        routes = routes_for(b)
        gc.collect()
        row = {
            "batch": b,
            "variant": name,
            "kv_cache_bytes_per_row": kv_bytes_per_row(built.model.config, prompt_len + new_tokens, dsize),
        }
        if built.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated()
            run(ids, mask, routes, settings)
            torch.cuda.synchronize()
            row["peak_bytes_per_row"] = (torch.cuda.max_memory_allocated() - held) / b
            row["method"] = "cuda max_memory_allocated - allocated before"
        else:
            run(ids, mask, routes, settings)  # warm the allocator once
            gc.collect()
            rss = RssPeak()
            run(ids, mask, routes, settings)
            row["rss_delta_bytes_per_row"] = rss.stop() / b
            row["method"] = "cpu RSS peak delta (rough: allocator caching)"
        rows.append(row)
    return rows


def peak_per_row(pm, built: common.Built, sizes: list[int], prompt_len: int, new_tokens: int, seed: int = 0) -> list:
    """Peaks of PEFT's mixed batch, then (when the gated model exists) of PRISM's gated mixed batch."""
    from bench_generation import peft_mixed

    rows = peak_rows(
        lambda i, m, r, s: peft_mixed(pm, i, m, r, s), "peft_mixed", built, sizes, prompt_len, new_tokens, seed
    )
    gm, _tmp = gated_adapter.gated_from_peft(pm, built, seed=seed)
    run = gated_adapter.runner(gm)
    rows += peak_rows(lambda i, m, r, s: run(i, m, r, s, False), "gated", built, sizes, prompt_len, new_tokens, seed)
    return rows


def main(argv: Optional[list] = None) -> dict:
    p = common.base_parser(__doc__.splitlines()[0], repeats=1)
    p.add_argument("--no-peak", action="store_true", help="accounting only (no generation)")
    args = p.parse_args(argv)
    dev, dtype = common.pick(args.device, args.dtype, args.threads)
    sizes = common.batch_sizes(args.batch_sizes)
    built = None
    if args.size in ("7b", "embedded") and (args.no_peak or not dev.startswith("cuda") and args.size == "7b"):
        model = meta_model(args.size)
        label = {
            "7b": "Qwen2.5-7B-Instruct shape (meta device: counted, not built)",
            "embedded": "SmolLM2-135M-Instruct shape (meta device)",
        }[args.size]
        dsize = 2 if args.dtype == "auto" else dtype_bytes(dtype)
    else:
        built = common.build_model(args.size, dev, dtype, seed=args.seed)
        model, label, dsize = built.model, built.label, dtype_bytes(dtype)
    acc = accounting(model, dtype_size=dsize)
    pm = acc.pop("_peft_model")
    settings = {
        "size": args.size,
        "model": label,
        "device": dev,
        "dtype": str(dtype),
        "bytes_per_param": dsize,
        "batch_sizes": sizes,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "lora": "r=16 on q,k,v,o,gate,up,down of layers 1..L-1",
        "gate": "hidden->128->64->1",
    }
    print(f"# Memory: adapter + gate vs base weights; peak per row\nmodel: {label}")
    print(
        common.table(
            [acc],
            [
                "base_params",
                "lora_params_hand",
                "lora_params_peft",
                "gate_params_hand",
                "gate_params_module",
                "extra_params",
                "extra_share_of_base",
                "extra_bytes",
            ],
        )
    )
    peaks = []
    if built is not None and not args.no_peak:
        peaks = peak_per_row(pm, built, sizes, args.prompt_len, args.new_tokens, seed=args.seed)
        cols = ["batch", "variant", "kv_cache_bytes_per_row", "peak_bytes_per_row", "rss_delta_bytes_per_row", "method"]
        print(common.table(peaks, cols))
    rows = [dict(acc, kind="accounting")] + [dict(r, kind="peak") for r in peaks]
    common.record(args.out, "memory", settings, rows)
    return {"accounting": acc, "peaks": peaks}


if __name__ == "__main__":
    main()
