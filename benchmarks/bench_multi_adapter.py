"""Benchmark: one adapter per persona - the cost of a mixed prefill with K = 1, 2, 4 adapters.

One prefill (prompt forward, KV cache built, last logits) of a batch of ``--batch-sizes`` rows, timed
for each variant in one run on one machine:

- ``base``           the base model alone (no gated module installed)
- ``none_routed``    PRISM's gated model (4 adapters installed), no row routed: must cost ``base``
- ``gated_K{1,2,4}`` the gated model with ``--routed`` of the rows routed, split evenly over K adapters
                     (each adapter's delta on its own rows: ``index_select`` / ``index_add``)
- ``peft_K{1,2,4}``  PEFT's mixed-adapter batch (``adapter_names=`` per row, ``__base__`` for the rest)
                     on the same rows: PEFT's own answer to the same batch

Each variant is also timed on one decode step (one new token per row on the prompt's KV cache,
``*_step_x`` columns), where the per-adapter gathers are a larger share of the work than in the prefill.
Every variant runs in turn, round after round, and reports its fastest round (round 0 warms up; on a
shared machine noise only adds time). The ``base`` variant is the same model with its plain ``Linear``
layers put back (no gated module), so every variant shares one copy of the base weights.
Ratios are to ``base``; ``max_diff`` is the largest |logit| difference between the gated model and PEFT on
the same rows (a check that both compute the same thing). The adapters are random (rank ``--rank``, every
attention + MLP projection of layers 1..L-1): speed does not depend on the weights' values.
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

KS = (1, 2, 4)
GPU_COMMAND = (
    "python benchmarks/bench_multi_adapter.py --size smol --device cuda --dtype bfloat16 --batch-sizes 16,64 "
    "--prompt-len 256 --repeats 10\n"
    "python benchmarks/bench_multi_adapter.py --size 7b --device cuda --batch-sizes 16,64 --prompt-len 256"
)


def prefill(model, ids, mask, **kw):
    import torch

    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **kw).logits[:, -1].float()


def decode_step(model, ids, mask, **kw):
    """``() -> last logits`` of one decode step on a prompt cache built once (cropped back after each step)."""
    import torch

    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **kw)
    cache, n = out.past_key_values, ids.shape[1]
    nxt = out.logits[:, -1:].argmax(-1)
    step_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    pos = step_mask.sum(-1, keepdim=True) - 1

    def step():
        with torch.inference_mode():
            logits = model(
                input_ids=nxt, attention_mask=step_mask, position_ids=pos, past_key_values=cache, use_cache=True, **kw
            ).logits
        cache.crop(n - cache.get_seq_length())  # back to the prompt (a negative count: tokens to drop)
        return logits[:, -1].float()

    return step


def random_adapters(model, k: int, r: int, seed: int, out: Path) -> tuple[object, list[tuple[str, Path]]]:
    """A PEFT model over ``model`` (in place) with ``k`` random LoRA adapters ``p0..p{k-1}``, saved to
    ``out/<name>`` (PEFT's ``save_pretrained`` layout for named adapters)."""
    import torch
    from peft import LoraConfig, get_peft_model

    n = int(model.config.num_hidden_layers)
    cfg = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        lora_dropout=0.0,
        target_modules=list(common.TARGET_MODULES),
        layers_to_transform=list(range(1, n)),
        init_lora_weights=False,
    )
    names = [f"p{i}" for i in range(k)]
    pm = get_peft_model(model, cfg, adapter_name=names[0])
    for name in names[1:]:
        pm.add_adapter(name, cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for pname, p in pm.named_parameters():
            if "lora_" in pname:
                p.normal_(0.0, 1.0 / (p.shape[1] ** 0.5))
    pm.eval()
    pm.save_pretrained(str(out))
    return pm, [(name, out / name) for name in names]


def row_plan(batch: int, routed: float, k: int) -> list[int]:
    """Adapter per row (-1 = base): the first ``routed`` share of the rows, adapters in turn."""
    n = round(batch * routed)
    return [i % k if i < n else -1 for i in range(batch)]


def measure(built: common.Built, sizes: list[int], prompt_len: int, repeats: int, routed: float, r: int, seed: int = 0):
    """The variants are timed in turn, round after round (round 0 warms up), and each reports its fastest
    round: on a machine shared with other jobs, noise only adds time, and interleaving spreads it."""
    import time

    import torch

    from prism_persona.gated.layers import GatedLoRALinear, RoutingState, install_adapters

    dev = built.device
    model = built.model
    peft_base = copy.deepcopy(model)
    tmp = tempfile.TemporaryDirectory(prefix="prism-bench-multi-")
    pm, adapters = random_adapters(peft_base, max(KS), r, seed, Path(tmp.name))
    pm.to(built.dtype)
    state = RoutingState()
    install_adapters(model, adapters, state)
    model.to(built.dtype)
    gated = {n: m for n, m in model.named_modules() if isinstance(m, GatedLoRALinear)}

    def put(base: bool) -> None:  # the bare base model (plain Linear layers) or the gated one, same weights
        for name, mod in gated.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, mod.base if base else mod)

    def timed_once(fn):
        common.sync(dev)
        t0 = time.perf_counter()
        out = fn()
        common.sync(dev)
        return time.perf_counter() - t0, out

    rows = []
    for b in sizes:
        ids, mask = common.random_prompts(built, b, prompt_len, seed=seed + b)
        variants = {
            "base": (lambda: put(True), model, {}),
            "none_routed": (lambda: (put(False), state.set(torch.zeros(b, dtype=torch.bool, device=dev))), model, {}),
        }
        for k in KS:
            plan = row_plan(b, routed, k)
            persona = torch.tensor(plan, device=dev)
            variants[f"gated_K{k}"] = (lambda p=persona: (put(False), state.set(p >= 0, persona=p)), model, {})
            names = [f"p{a}" if a >= 0 else "__base__" for a in plan]
            variants[f"peft_K{k}"] = (lambda: None, pm, {"adapter_names": names})
        steps = {}
        for name, (setup, m, kw) in variants.items():
            setup()
            steps[name] = decode_step(m, ids, mask, **kw)
        pre: dict = {name: [] for name in variants}
        dec: dict = {name: [] for name in variants}
        last = {}
        for rnd in range(max(1, repeats) + 1):
            for name, (setup, m, kw) in variants.items():
                setup()
                t, last[name] = timed_once(lambda: prefill(m, ids, mask, **kw))
                t_step, _ = timed_once(steps[name])
                if rnd:  # round 0 warms up
                    pre[name].append(t)
                    dec[name].append(t_step)
        put(False)
        best = {name: min(v) for name, v in pre.items()}
        best_step = {name: min(v) for name, v in dec.items()}
        row = {"batch": b, "routed_rows": round(b * routed), "base_s": best["base"], "base_step_s": best_step["base"]}
        row["none_routed_x"] = best["none_routed"] / best["base"]
        row["none_step_x"] = best_step["none_routed"] / best_step["base"]
        row["none_equal_base"] = bool(torch.equal(last["none_routed"], last["base"]))
        for k in KS:
            for kind in ("gated", "peft"):
                v = f"{kind}_K{k}"
                row.update(
                    {
                        f"{v}_s": best[v],
                        f"{v}_x": best[v] / best["base"],
                        f"{v}_step_x": best_step[v] / best_step["base"],
                    }
                )
            row[f"max_diff_K{k}"] = float((last[f"gated_K{k}"] - last[f"peft_K{k}"]).abs().max())
        rows.append(row)
    tmp.cleanup()
    return rows


def main(argv: Optional[list] = None) -> list[dict]:
    p = common.base_parser(__doc__.splitlines()[0], batch_sizes="16", prompt_len=64, repeats=3)
    p.add_argument("--routed", type=float, default=0.75, help="share of the rows routed (split over the K adapters)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of each adapter (PRISM's distill.r default)")
    p.set_defaults(size="smol")
    args = p.parse_args(argv)
    built, sizes, settings = common.setup(args, "prompt_len", "routed", "rank", "threads")
    common.print_header("One adapter per persona: mixed-batch prefill with K adapters", built, settings)
    rows = measure(built, sizes, args.prompt_len, args.repeats, args.routed, args.rank, seed=args.seed)
    cols = ["batch", "routed_rows", "base_s", "none_routed_x", "none_equal_base"]
    cols += [f"gated_K{k}_x" for k in KS] + [f"peft_K{k}_x" for k in KS] + [f"max_diff_K{k}" for k in KS]
    print(common.table(rows, cols))
    step_cols = ["batch", "base_step_s", "none_step_x"]
    step_cols += [f"gated_K{k}_step_x" for k in KS] + [f"peft_K{k}_step_x" for k in KS]
    print("\nOne decode step (ratios to the base model's step):\n" + common.table(rows, step_cols))
    print("\nOn a GPU (same script; bf16):\n" + GPU_COMMAND)
    common.record(args.out, "multi_adapter", settings, rows)
    return rows


if __name__ == "__main__":
    main()
