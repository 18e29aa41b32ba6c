"""A fast decode loop: static KV cache, one compiled decode step (CUDA graphs on GPU), eager on CPU.

A benchmark of a possible decode path (bench_generation, bench_routing); no PRISM command uses it.

Plain ``model.generate`` re-plans every step in Python (logits processors, stopping criteria, a
dynamic cache that grows by concatenation). For the gated model the work per step is fixed once the
prefill has decided the route, so the loop can be made static:

1. **Prefill** (eager): the prompt runs once into a preallocated :class:`transformers.StaticCache`
   of length ``prompt + max_new_tokens``. For a gated model this is where the gate reads layer 0
   and the per-row LoRA mask is set; ``on_prefill_done`` is the place to freeze it.
2. **Decode**: one token per row per step. The attention mask has its final, full length from the
   start (prompt padding, then ones: causality hides the future slots), positions advance by one,
   and the cache is written in place, so every step has identical shapes and addresses. On CUDA the
   step is compiled with ``torch.compile(mode="reduce-overhead")`` (CUDA graphs); on CPU it runs eager.

Positions follow ``generate``'s rule for left padding (``cumsum(mask) - 1``), so greedy output equals
plain ``generate``'s token for token (up to float rounding of different kernels on GPU).

:func:`generate` is the entry point; pass ``fast=False`` (or call on a model this loop does not
support) and it falls back to plain ``model.generate``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from prism_persona.gated.features import position_ids_from_mask

log = logging.getLogger(__name__)


@dataclass
class DecodeSettings:
    """How to pick tokens. ``temperature == 0`` is greedy; ``ignore_eos`` forces the full length."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    eos_token_id: Optional[Sequence[int] | int] = None
    pad_token_id: int = 0
    ignore_eos: bool = False
    seed: Optional[int] = None

    def eos_ids(self) -> list[int]:
        """EOS ids as a list (empty when there is none or EOS is ignored)."""
        if self.ignore_eos or self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, int):
            return [self.eos_token_id]
        return [int(i) for i in self.eos_token_id]


def select_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Greedy (``temperature == 0``) or temperature + nucleus sampling over the last-position logits."""
    if not temperature or temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, sorted_i = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the first token is always kept
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(-1, sorted_i, sorted_p)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator).squeeze(-1)


def _static_cache(model, max_cache_len: int):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_cache_len)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _raise_recompile_limit(limit: int = 64) -> None:
    """Every FastDecoder shares one decode-step code object, and each (model, batch, length, routing
    class) is a separate graph: dynamo's default of 8 graphs per code object would silently fall
    back to eager after the 8th. Raise it (never lower it)."""
    import torch._dynamo.config as dcfg

    for name in ("recompile_limit", "cache_size_limit"):
        if isinstance(getattr(dcfg, name, None), int) and getattr(dcfg, name) < limit:
            setattr(dcfg, name, limit)


def backend_is_custom(dec) -> bool:
    return getattr(dec, "backend", None) is not None


class FastDecoder:
    """Static-cache decode loop for one causal LM (any module with the HF causal-LM ``forward``).

    ``compile``: ``None`` compiles the decode step on CUDA only; ``True``/``False`` force it.
    The compiled step is reused across calls of the same batch size and total length.
    ``backend``: a ``torch.compile`` backend instead of ``mode="reduce-overhead"`` (tests use
    ``"eager"`` to check on CPU that the step traces, hooks and routing state included).
    """

    def __init__(self, model, compile: Optional[bool] = None, backend: Optional[str] = None):
        self.model = model
        device = _model_device(model)
        self.compile = (device.type == "cuda") if compile is None else bool(compile)
        self.backend = backend
        self._caches: dict = {}
        self._step = self._decode_step
        if self.compile:
            # dynamic=False: one graph per (batch, length); the cache is reused per shape, so the
            # graph's static addresses (KV tensors, mask) stay the same from call to call.
            _raise_recompile_limit()
            opts = {"backend": backend} if backend else {"mode": "reduce-overhead"}
            self._step = torch.compile(self._decode_step, fullgraph=False, dynamic=False, **opts)

    def cache_for(self, batch: int, max_len: int, device, dtype):
        """A reset static cache for this shape (kept between calls: stable addresses for CUDA graphs)."""
        key = (batch, max_len, str(device), str(dtype))
        cache = self._caches.get(key)
        if cache is None:
            if len(self._caches) >= 4:
                self._caches.clear()
            cache = self._caches[key] = _static_cache(self.model, max_len)
        else:
            cache.reset()
        return cache

    def _decode_step(
        self,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache,
        forward_kwargs: dict,
    ) -> torch.Tensor:
        """One token per row through the whole model; returns the next-token logits (B, vocab)."""
        out = self.model(
            input_ids=tokens,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            **forward_kwargs,
        )
        return out.logits[:, -1, :]

    @torch.no_grad()  # not inference_mode: the static cache outlives the call (as in HF's compiled generate)
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        settings: DecodeSettings,
        forward_kwargs: Optional[dict] = None,
        prefill_kwargs: Optional[dict] = None,
        on_prefill_done: Optional[Callable[[], Any]] = None,
    ) -> torch.Tensor:
        """New tokens ``(B, max_new_tokens)``; rows that stopped are filled with ``pad_token_id``.

        ``forward_kwargs`` go to every forward (e.g. PEFT's ``adapter_names``); ``prefill_kwargs``
        only to the prefill. ``on_prefill_done()`` runs between prefill and decode.
        """
        fw = dict(forward_kwargs or {})
        B, T = input_ids.shape
        N = int(settings.max_new_tokens)
        device = input_ids.device
        generator = None
        if settings.seed is not None:
            generator = torch.Generator(device=device).manual_seed(int(settings.seed))
        cache = self.cache_for(B, T + N, device, next(self.model.parameters()).dtype)
        mask = torch.ones(B, T + N, dtype=attention_mask.dtype, device=device)
        mask[:, :T] = attention_mask
        positions = position_ids_from_mask(attention_mask)

        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            **fw,
            **(prefill_kwargs or {}),
        )
        logits = out.logits[:, -1, :]
        if on_prefill_done is not None:
            on_prefill_done()

        eos = torch.tensor(settings.eos_ids(), dtype=torch.long, device=device)
        result = torch.full((B, N), settings.pad_token_id, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        next_pos = positions[:, -1:] + 1
        for step in range(N):
            token = select_tokens(logits, settings.temperature, settings.top_p, generator)
            token = torch.where(done, torch.full_like(token, settings.pad_token_id), token)
            result[:, step] = token
            if eos.numel():
                done = done | torch.isin(token, eos)
                if step % 8 == 7 and bool(done.all()):  # a host sync only every few steps
                    break
            if step == N - 1:
                break
            if self.compile and device.type == "cuda" and not backend_is_custom(self):
                torch.compiler.cudagraph_mark_step_begin()
            logits = self._step(token[:, None].clone(), mask, next_pos.clone(), cache, fw).clone()
            next_pos = next_pos + 1
        return result


def decoder_for(model, compile: Optional[bool] = None) -> FastDecoder:
    """The :class:`FastDecoder` of ``model`` (one per model and compile setting, so graphs are reused).

    Kept on the model itself (``model._prism_fast_decoders``): it lives and dies with the model.
    """
    per_model = model.__dict__.setdefault("_prism_fast_decoders", {})
    key = "auto" if compile is None else bool(compile)
    if key not in per_model:
        per_model[key] = FastDecoder(model, compile=compile)
    return per_model[key]


def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    settings: DecodeSettings,
    fast: bool = True,
    compile: Optional[bool] = None,
    forward_kwargs: Optional[dict] = None,
    decoder: Optional[FastDecoder] = None,
) -> torch.Tensor:
    """New tokens ``(B, max_new_tokens)``: the static-cache loop, or plain ``generate`` with ``fast=False``.

    Both paths pad a stopped row with ``settings.pad_token_id`` after its EOS.
    """
    if fast:
        dec = decoder or decoder_for(model, compile)
        return dec.generate(input_ids, attention_mask, settings, forward_kwargs=forward_kwargs)
    return plain_generate(model, input_ids, attention_mask, settings, forward_kwargs)


def plain_generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    settings: DecodeSettings,
    forward_kwargs: Optional[dict] = None,
) -> torch.Tensor:
    """The fallback: ``model.generate`` with the same settings; returns new tokens ``(B, N)``."""
    N = int(settings.max_new_tokens)
    gc = copy.deepcopy(model.generation_config)
    gc.max_new_tokens, gc.min_new_tokens, gc.pad_token_id = N, None, settings.pad_token_id
    # ignore_eos: EOS neither stops nor is suppressed (like vLLM's ignore_eos; HF's min_new_tokens
    # would instead forbid EOS, changing greedy outputs)
    gc.eos_token_id = settings.eos_ids() or None
    if settings.temperature and settings.temperature > 0:
        gc.do_sample, gc.temperature, gc.top_p, gc.top_k = True, settings.temperature, settings.top_p, 0
    else:
        gc.do_sample, gc.temperature, gc.top_p, gc.top_k = False, None, None, None
    if settings.seed is not None:
        torch.manual_seed(int(settings.seed))
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=gc, **(forward_kwargs or {})
        )
    new = out[:, input_ids.shape[1] :]
    if new.shape[1] < N:  # every row stopped early
        pad = torch.full((new.shape[0], N - new.shape[1]), settings.pad_token_id, dtype=new.dtype, device=new.device)
        new = torch.cat([new, pad], dim=1)
    return new


def _routing_context(gated, force, batch: int):
    """The gated model's per-call routing context: the gate decides in the prefill, decode keeps it.

    Uses ``GatedModel.routing(force)`` when the gated model offers it, else its internal ``_call``.
    """
    from prism_persona.gated.model import normalise_force

    overrides = normalise_force(force, batch)
    public = getattr(gated, "routing", None)
    if callable(public):
        return public(overrides)
    return gated._call(overrides, [None] * batch)


def generate_gated(
    gated,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    settings: DecodeSettings,
    force=None,
    fast: bool = True,
    compile: Optional[bool] = None,
    decoder: Optional[FastDecoder] = None,
) -> tuple[torch.Tensor, list[bool], list[float]]:
    """Generate with a :class:`prism_persona.gated.model.GatedModel` on token ids: ``(new tokens, routed, probs)``.

    The gate runs inside the (eager) prefill through the gated model's layer-0 hook; the per-row LoRA
    flags it sets stay fixed for every decode step, so the decode step is a static graph. ``force``
    is ``None`` (the gate decides), a bool, or one bool/None per row. ``fast=False`` runs plain
    ``generate`` under the same routing.
    """
    input_ids, attention_mask = input_ids.to(gated.device), attention_mask.to(gated.device)
    with _routing_context(gated, force, input_ids.shape[0]) as state:
        if fast:
            dec = decoder or decoder_for(gated.model, compile)
            new = dec.generate(input_ids, attention_mask, settings)
        else:
            new = plain_generate(gated.model, input_ids, attention_mask, settings)
        routed = [bool(x) for x in state.routed.tolist()]
        probs = [float(x) for x in state.probs.tolist()]
    return new, routed, probs
