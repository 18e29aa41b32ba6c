"""Benchmark 1: generation throughput of a mixed batch (half routed, half not) against the alternatives.

Variants, all greedy, all forced to ``--new-tokens`` (EOS disabled), measured in one run:

- ``base``            the base model alone, plain ``generate`` (the reference speed, ratio 1.0)
- ``base_fast``       the base model through ``benchmarks/fastgen.py`` (static cache; CUDA graphs on GPU)
- ``lora``            the always-on LoRA, unmerged (PEFT), every row
- ``lora_fast``       the same through ``fastgen``
- ``lora_merged``     the always-on LoRA merged into the weights (as fast as base, but no routing)
- ``peft_mixed``      PEFT's mixed-adapter batch: ``generate(..., adapter_names=[...])``, ``__base__`` rows
- ``ref_sequential``  the reference approach: per query a full extra forward pass to route, then the
                      adapter switched on or off and the query generated alone (measured on
                      ``--sequential-rows`` rows; tokens/s is per-row throughput, so it extrapolates)
- ``ref_grouped``     the reference approach with queries grouped by route: one routing forward over
                      the batch, then one ``generate`` with the adapter and one without
- ``gated`` / ``gated_fast``  PRISM's gated model (gate inside the prefill, per-row LoRA mask),
                      when ``prism_persona.gated.model`` exists in this checkout

Correctness (greedy): for every mixed variant, routed rows must equal the ``lora`` rows and
un-routed rows the ``base`` rows; the ``agree`` column is the share of rows that do.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import gated_adapter  # noqa: E402


def routes_for(batch: int) -> list[bool]:
    """Half of the rows routed (even rows); a batch of one is routed."""
    return [i % 2 == 0 for i in range(batch)]


def settings_for(built: common.Built, new_tokens: int):
    from fastgen import DecodeSettings

    pad = int(built.model.generation_config.pad_token_id or 0)
    return DecodeSettings(max_new_tokens=new_tokens, pad_token_id=pad, ignore_eos=True)


def plain(model, ids, mask, settings, **forward_kwargs):
    """Plain HF ``generate`` (forced length); returns the new tokens."""
    from fastgen import plain_generate

    return plain_generate(model, ids, mask, settings, forward_kwargs or None)


def agreement(out, routes, lora_out, base_out) -> float:
    """Share of rows equal to the LoRA rows (routed) or the base rows (not routed)."""
    ok = 0
    for i, routed in enumerate(routes):
        ref = lora_out if routed else base_out
        ok += int(bool((out[i].cpu() == ref[i].cpu()).all()))
    return ok / max(1, len(routes))


def route_pass(pm, gate, ids, mask):
    """The reference router: a full base forward of the prompt, the gate on layer 0's last token."""
    import torch

    with torch.inference_mode(), pm.disable_adapter():
        out = pm(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
        h = out.hidden_states[1][:, -1, :]
        return torch.sigmoid(gate(h).squeeze(-1))


def reference_grouped(pm, gate, ids, mask, routes, settings):
    """Route the batch with an extra forward, then one generate per route group; rows back in order."""
    import torch

    route_pass(pm, gate, ids, mask)  # the decision's cost; the benchmark fixes the routes to half/half
    out = torch.empty(ids.shape[0], settings.max_new_tokens, dtype=torch.long, device=ids.device)
    on = [i for i, r in enumerate(routes) if r]
    off = [i for i, r in enumerate(routes) if not r]
    if on:
        out[on] = plain(pm, ids[on], mask[on], settings)
    if off:
        with pm.disable_adapter():
            out[off] = plain(pm, ids[off], mask[off], settings)
    return out


def reference_sequential(pm, gate, ids, mask, routes, settings):
    """Per query: a routing forward, then the adapter on or off, the query generated alone."""
    import torch

    rows = []
    for i, routed in enumerate(routes):
        q, m = ids[i : i + 1], mask[i : i + 1]
        route_pass(pm, gate, q, m)
        if routed:
            rows.append(plain(pm, q, m, settings))
        else:
            with pm.disable_adapter():
                rows.append(plain(pm, q, m, settings))
    return torch.cat(rows, dim=0)


def peft_mixed(pm, ids, mask, routes, settings, fast: bool = False):
    """PEFT's mixed-adapter batch: per-row adapter names, ``__base__`` for un-routed rows."""
    import fastgen

    names = ["default" if r else "__base__" for r in routes]
    if fast:
        return fastgen.generate(pm, ids, mask, settings, compile=False, forward_kwargs={"adapter_names": names})
    return plain(pm, ids, mask, settings, adapter_names=names)


def measure(
    built: common.Built,
    sizes: list[int],
    prompt_len: int,
    new_tokens: int,
    repeats: int,
    seq_rows: int,
    seed: int = 0,
    ragged: bool = False,
    skip: tuple = (),
) -> list[dict]:
    """Every variant at every batch size; returns one row per (batch, variant)."""
    import fastgen

    dev = built.device
    settings = settings_for(built, new_tokens)
    prompts = {b: common.random_prompts(built, b, prompt_len, seed=seed + b, ragged=ragged) for b in sizes}
    res: dict = {b: {} for b in sizes}

    def run(b, name, fn, rows_measured=None):
        if name in skip:
            return None
        sec, out = common.timed(fn, dev, repeats=repeats)
        n_rows = rows_measured if rows_measured is not None else b
        res[b][name] = {"seconds": sec, "tokens_per_s": n_rows * new_tokens / sec, "out": out, "rows_measured": n_rows}
        return out

    # phase 1: the bare base model (no LoRA layers injected yet)
    for b in sizes:
        ids, mask = prompts[b]
        run(b, "base", lambda: plain(built.model, ids, mask, settings))
        run(b, "base_fast", lambda: fastgen.generate(built.model, ids, mask, settings))

    # phase 2: PEFT LoRA injected in place (unmerged): always-on, PEFT mixed batches, reference approach
    pm = common.add_random_lora(built.model, seed=seed)
    pm.to(built.dtype)
    gate = common.make_random_gate(built.hidden, dev, built.dtype, seed=seed)
    for b in sizes:
        ids, mask = prompts[b]
        routes = routes_for(b)
        k = min(b, seq_rows)
        run(b, "lora", lambda: plain(pm, ids, mask, settings))
        run(b, "lora_fast", lambda: fastgen.generate(pm, ids, mask, settings))
        run(b, "peft_mixed", lambda: peft_mixed(pm, ids, mask, routes, settings))
        run(b, "ref_grouped", lambda: reference_grouped(pm, gate, ids, mask, routes, settings))
        run(
            b,
            "ref_sequential",
            lambda: reference_sequential(pm, gate, ids[:k], mask[:k], routes[:k], settings),
            rows_measured=k,
        )

    # phase 3: the same adapter in PRISM's gated model (PEFT unloaded, same base weights)
    if "gated" not in skip:
        gm, _tmp = gated_adapter.gated_from_peft(pm, built, seed=seed)
        gated = gated_adapter.runner(gm)
        for b in sizes:
            ids, mask = prompts[b]
            routes = routes_for(b)
            run(b, "gated", lambda: gated(ids, mask, routes, settings, False))
            run(b, "gated_fast", lambda: gated(ids, mask, routes, settings, True))
        merged = gated_adapter.merge_and_strip(gm)
    else:
        merged = pm.merge_and_unload()

    # phase 4: the always-on LoRA merged into the weights (last: merging changes the base weights)
    for b in sizes:
        ids, mask = prompts[b]
        run(b, "lora_merged", lambda: plain(merged, ids, mask, settings))
    return summarise(res, sizes)


MIXED = ("peft_mixed", "ref_grouped", "ref_sequential", "gated", "gated_fast")


def summarise(res: dict, sizes: list[int]) -> list[dict]:
    """Rows with tokens/s, ratio to base, and the greedy agreement checks."""
    rows = []
    for b in sizes:
        r = res[b]
        base, lora = r.get("base"), r.get("lora")
        for name, v in r.items():
            row = {
                "batch": b,
                "variant": name,
                "tokens_per_s": v["tokens_per_s"],
                "seconds": v["seconds"],
                "rows_measured": v["rows_measured"],
            }
            if base:
                row["ratio_to_base"] = v["tokens_per_s"] / base["tokens_per_s"]
            k = v["rows_measured"]
            routes = routes_for(b)[:k]
            if name == "lora" and base:
                row["differs_from_base"] = 1.0 - agreement(v["out"], [True] * b, base["out"], base["out"])
            if name in MIXED and base and lora:
                row["agree"] = agreement(v["out"], routes, lora["out"], base["out"])
            elif name in ("base_fast",) and base:
                row["agree"] = agreement(v["out"], [False] * b, base["out"], base["out"])
            elif name in ("lora_fast", "lora_merged") and lora:
                row["agree"] = agreement(v["out"], [True] * b, lora["out"], lora["out"])
            rows.append(row)
    return rows


def main(argv: Optional[list] = None) -> list[dict]:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument(
        "--sequential-rows",
        type=int,
        default=8,
        help="rows the one-by-one reference approach is timed on (its tokens/s is per row)",
    )
    p.add_argument("--ragged", action="store_true", help="left-padded prompts of varied lengths")
    p.add_argument("--skip", default="", help="comma-separated variants to leave out")
    args = p.parse_args(argv)
    built, sizes, settings = common.setup(args, "prompt_len", "new_tokens", "sequential_rows", "ragged")
    settings.update(lora="r=16 alpha=32 on q,k,v,o,gate,up,down of layers 1..L-1", routed_share=0.5)
    common.print_header("Generation throughput: mixed batch (half routed) vs alternatives", built, settings)
    rows = measure(
        built,
        sizes,
        args.prompt_len,
        args.new_tokens,
        args.repeats,
        args.sequential_rows,
        seed=args.seed,
        ragged=args.ragged,
        skip=tuple(s for s in args.skip.split(",") if s),
    )
    print(
        common.table(
            rows, ["batch", "variant", "tokens_per_s", "ratio_to_base", "agree", "differs_from_base", "rows_measured"]
        )
    )
    common.record(args.out, "generation", settings, rows)
    return rows


if __name__ == "__main__":
    main()
