"""Benchmark 2: the cost of routing, as a share of the prefill.

Measured per batch size on the same prompts:

- ``prefill``         the base model's prefill (full prompt forward, KV cache built, last logits)
- ``prefill_gated``   the same prefill with a forward hook on layer 0 that runs the gate MLP on the
                      last prompt token and thresholds it (what the gated model does inside its prefill)
- ``gate_mlp``        the gate MLP alone on ``(B, hidden)`` states (the hook's own work, timed directly:
                      the difference of two prefill timings is within noise)
- ``layer0_pass``     the separate route-only pass: embeddings + layer 0 + gate, the rest skipped
- ``gated_prefill``   PRISM's ``GatedModel.forward_logits`` (gate on) vs ``force=False`` when
                      ``prism_persona.gated.model`` is in this checkout

Shares: ``(prefill_gated - prefill) / prefill``, ``gate_mlp / prefill``, ``layer0_pass / prefill``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import gated_adapter  # noqa: E402


class _Stop(Exception):
    """Raised by the layer-0 hook of the route-only pass to skip layers 1..L-1."""


def prefill(model, ids, mask):
    """One prefill as ``generate`` does it: cache built, only the last position's logits."""
    import torch

    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1).logits


def gate_hook(gate, threshold: float = 0.5, sink: Optional[dict] = None):
    """A layer-0 forward hook: gate probability of the last prompt token of every row."""
    import torch

    def hook(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        prob = torch.sigmoid(gate(h[:, -1, :]).squeeze(-1))
        if sink is not None:
            sink["prob"] = prob
            sink["routed"] = prob >= threshold
        return None

    return hook


def prefill_with_gate(model, gate, ids, mask, sink: Optional[dict] = None):
    """The prefill with the gate hook on layer 0 (removed afterwards)."""
    from prism_persona.models import decoder_layers

    handle = decoder_layers(model)[0].register_forward_hook(gate_hook(gate, sink=sink))
    try:
        return prefill(model, ids, mask)
    finally:
        handle.remove()


def layer0_route(model, gate, ids, mask, sink: Optional[dict] = None):
    """Route-only: embeddings + layer 0 + gate; a hook raises to skip the remaining layers."""
    import torch

    from prism_persona.models import decoder_layers

    inner = gate_hook(gate, sink=sink)

    def stop(module, args, out):
        inner(module, args, out)
        raise _Stop

    handle = decoder_layers(model)[0].register_forward_hook(stop)
    try:
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return sink


def gate_only(gate, states):
    import torch

    with torch.inference_mode():
        return torch.sigmoid(gate(states).squeeze(-1))


def measure(built: common.Built, sizes: list[int], prompt_len: int, repeats: int, seed: int = 0) -> list[dict]:
    """One row per batch size with the timings (seconds) and the shares of the prefill."""
    import torch

    dev = built.device
    gate = common.make_random_gate(built.hidden, dev, built.dtype, seed=seed)
    rows = []
    for b in sizes:
        ids, mask = common.random_prompts(built, b, prompt_len, seed=seed + b)
        t_pre, logits = common.timed(lambda: prefill(built.model, ids, mask), dev, repeats)
        sink: dict = {}
        t_gated, logits_g = common.timed(lambda: prefill_with_gate(built.model, gate, ids, mask, sink), dev, repeats)
        sink0: dict = {}
        t_l0, _ = common.timed(lambda: layer0_route(built.model, gate, ids, mask, sink0), dev, repeats)
        states = torch.randn(b, built.hidden, device=dev, dtype=built.dtype)
        t_mlp, _ = common.timed(lambda: gate_only(gate, states), dev, max(repeats, 10))
        rows.append(
            {
                "batch": b,
                "prefill_s": t_pre,
                "prefill_gated_s": t_gated,
                "gate_mlp_s": t_mlp,
                "layer0_pass_s": t_l0,
                "hook_share": (t_gated - t_pre) / t_pre,
                "gate_mlp_share": t_mlp / t_pre,
                "layer0_share": t_l0 / t_pre,
                "same_logits": bool(torch.equal(logits, logits_g)),
                "same_route": bool(torch.equal(sink["routed"], sink0["routed"])),
            }
        )
    gated_rows(built, sizes, prompt_len, repeats, rows, seed)
    return rows


def gated_rows(
    built: common.Built, sizes: list[int], prompt_len: int, repeats: int, rows: list[dict], seed: int = 0
) -> None:
    """Add PRISM's own numbers: its prefill with the gate hook vs the hook detached (LoRA rows off)."""
    import torch

    from prism_persona.models import decoder_layers

    pm = common.add_random_lora(built.model, seed=seed)
    pm.to(built.dtype)
    gm, _tmp = gated_adapter.gated_from_peft(pm, built, seed=seed)
    for row in rows:
        b = row["batch"]
        ids, mask = common.random_prompts(built, b, prompt_len, seed=seed + b)
        off = [False] * b

        def with_gate():
            with fastgen_context(gm, off):
                return prefill(gm.model, ids, mask)

        t_on, _ = common.timed(with_gate, built.device, repeats)
        gm._hook.remove()
        gm.state.set(torch.zeros(b, dtype=torch.bool, device=built.device))
        t_off, _ = common.timed(lambda: prefill(gm.model, ids, mask), built.device, repeats)
        gm._hook = decoder_layers(gm.model)[0].register_forward_hook(gm._layer0_hook)
        row.update(gated_prefill_s=t_on, gated_prefill_nohook_s=t_off, gated_hook_share=(t_on - t_off) / t_off)


def fastgen_context(gm, force):
    from fastgen import _routing_context

    return _routing_context(gm, force, len(force))


def main(argv: Optional[list] = None) -> list[dict]:
    p = common.base_parser(__doc__.splitlines()[0], repeats=5)
    args = p.parse_args(argv)
    built, sizes, settings = common.setup(args, "prompt_len")
    settings["gate"] = "MLP hidden->128->64->1 (random)"
    common.print_header("Routing cost as a share of the prefill", built, settings)
    rows = measure(built, sizes, args.prompt_len, args.repeats, seed=args.seed)
    print(
        common.table(
            rows,
            [
                "batch",
                "prefill_s",
                "prefill_gated_s",
                "hook_share",
                "gate_mlp_share",
                "layer0_pass_s",
                "layer0_share",
                "gated_hook_share",
                "same_logits",
                "same_route",
            ],
        )
    )
    common.record(args.out, "routing", settings, rows)
    return rows


if __name__ == "__main__":
    main()
