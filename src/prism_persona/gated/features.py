"""The gate's input: the hidden state after decoder layer 0, pooled over the prompt.

Two poolings (``GateConfig.pooling``, stored in ``gate_config.json``): ``mean`` = the mean over every
real token of the prompt (the default since issue 13: it carries the query's topic; measured in
docs/method-check.md) and ``last`` = the last prompt token (the paper's feature; with a chat template
that token is the fixed generation prompt, whose layer-0 state sees the query only through one
attention layer). Both are computed from the layer-0 output and the attention mask alone, so the
gated model computes them inside its prefill.

This is the one copy of the feature code. Training (:func:`query_features`, used by
:mod:`prism_persona.train.gate`) and inference (the layer-0 hook inside
:class:`prism_persona.gated.model.GatedModel`'s prefill) all
call these functions, so the gate sees identical inputs in training and serving: the prompt exactly as
the model sees it at inference, ``render_chat(tok, [{"role": "user", "content": query}])`` with the
generation prompt and no persona, left-padded, positions counted over real tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch

from ..models import decoder_layers, encode_prompts, render_chat, user_chat

FEATURE_LAYER = 0
POOLINGS = ("mean", "last")


class _StopForward(Exception):
    """Raised by the layer-0 hook to end a forward pass early (nothing after layer 0 runs)."""


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only (as ``generate`` does for left-padded batches)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row (works for left and right padding)."""
    n = attention_mask.shape[1]
    ar = torch.arange(n, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), ar, torch.full_like(ar, -1)).max(dim=1).values


def layer_output(out: Any) -> torch.Tensor:
    """The hidden states a decoder layer returned (a tensor, or the first item of a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def layer0_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden states after decoder layer 0, ``[batch, seq, hidden]``, computing embeddings + layer 0 only.

    The model's own forward builds the attention mask and rotary embeddings; a forward hook on layer 0
    captures its output and raises, so layers 1..L-1 and the LM head never run.
    """
    captured: dict = {}

    def hook(module, args, out):
        captured["h"] = layer_output(out)
        raise _StopForward

    handle = decoder_layers(model)[FEATURE_LAYER].register_forward_hook(hook)
    try:
        model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "h" not in captured:
        raise RuntimeError("decoder layer 0 did not run")
    return captured["h"]


def pool_states(h: torch.Tensor, attention_mask: Optional[torch.Tensor], pooling: str) -> torch.Tensor:
    """The gate features ``[batch, hidden]`` (float32) of layer-0 states ``h`` ``[batch, seq, hidden]``.

    ``attention_mask`` (``[batch, >= seq]``, 1 = real token; ``None`` = no padding) marks the real
    tokens; any padding side works. ``last``: the last real token; ``mean``: the mean over real tokens.
    """
    if attention_mask is None:
        attention_mask = torch.ones(h.shape[:2], dtype=torch.long, device=h.device)
    mask = attention_mask[:, : h.shape[1]].to(h.device)
    if pooling == "last":
        return h[torch.arange(h.shape[0], device=h.device), last_token_index(mask)].float()
    if pooling == "mean":
        m = mask.unsqueeze(-1).float()
        return (h.float() * m).sum(1) / m.sum(1).clamp_min(1.0)
    raise ValueError(f"unknown gate pooling '{pooling}'; use one of {', '.join(POOLINGS)}")


@torch.no_grad()
def prompt_features(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """The gate's feature of tokenised prompts, ``[batch, hidden]`` (float32): layer-0 states pooled as
    ``pooling`` (the gate's own: ``Gate.pooling``). Any padding side. Every path that routes from token
    ids (training, ``GatedModel.route``, the vLLM router, ``prism-lm-eval``) calls this one function;
    the gated model's prefill hook pools the same layer-0 states with :func:`pool_states`."""
    return pool_states(layer0_states(model, input_ids, attention_mask), attention_mask, pooling)


def gate_prompt(tokenizer, query: str) -> str:
    """The prompt text the gate reads: the query as a lone user turn, generation prompt, no persona."""
    return render_chat(tokenizer, user_chat(query))


@torch.no_grad()
def query_features(model, tokenizer, queries: Sequence[str], batch_size: int, pooling: str) -> torch.Tensor:
    """Gate features ``[n, hidden]`` (float32, CPU) of ``queries``, batched with left padding; ``pooling``:
    the gate's (GateConfig.pooling when training, the artifact's at inference)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(queries), batch_size):
        texts = [gate_prompt(tokenizer, q) for q in queries[start : start + batch_size]]
        enc = encode_prompts(tokenizer, texts, device)
        out.append(prompt_features(model, enc["input_ids"], enc["attention_mask"], pooling).cpu())
    if not out:
        hidden = int(getattr(model.config, "hidden_size", 0))
        return torch.zeros(0, hidden)
    return torch.cat(out)
