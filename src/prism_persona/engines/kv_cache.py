"""A KV cache that is not copied at every step: the in-process engine's decoding without ``torch.cat``.

``transformers``' dynamic cache grows each layer's keys and values with ``torch.cat`` at every decode
step, so every step copies the whole cache: O(length) work per token, O(length^2) per answer. In the
README main command's answers stage (SmolLM2-135M on a CPU, ``benchmarks/bench_cpu_engine.py
--profile``) that copy was 15 % of the engine's time. :func:`preallocated_cache` is the same dynamic
cache whose layers write into buffers sized once (prompt + new tokens) and give attention a view of
the filled part: the same values in the same order, so generation is token for token the same.

It is used only where it is exactly the dynamic cache: every layer a plain full-attention layer
(sliding-window and hybrid models keep ``generate``'s own cache) and ``transformers`` with cache
layers (>= 4.56); otherwise :func:`preallocated_cache` returns ``None``.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

try:  # transformers >= 4.56: caches made of per-layer objects
    from transformers.cache_utils import DynamicCache, DynamicLayer
except ImportError:  # pragma: no cover - older transformers: generate's own cache
    DynamicCache = DynamicLayer = None  # type: ignore[assignment,misc]


if DynamicLayer is not None:

    class PreallocatedLayer(DynamicLayer):
        """A dynamic cache layer whose keys/values live in buffers of ``capacity`` positions, allocated
        at the first update; an update writes in place and exposes the filled part as a view. Layers
        made together share one :class:`_Arena`: the first layer's update allocates the keys and values
        of all of them as one block."""

        def __init__(self, capacity: int, arena: Optional[_Arena] = None):
            super().__init__()
            self.capacity = int(capacity)
            self.length = 0
            self.rows = 0
            self.arena = arena

        def lazy_initialization(self, key_states, value_states, *args, **kwargs) -> None:
            b, _, _, _ = key_states.shape
            self.device = key_states.device
            kshape = (b, key_states.shape[1], self.capacity, key_states.shape[-1])
            vshape = (b, value_states.shape[1], self.capacity, value_states.shape[-1])
            got = self.arena.take(kshape, vshape, key_states) if self.arena is not None else None
            if got is None:
                got = key_states.new_empty(kshape), value_states.new_empty(vshape)
            self._keys, self._values = got
            self.keys, self.values = self._keys[:, :, :0], self._values[:, :, :0]
            self.rows = b
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if end > self.capacity:
                raise RuntimeError(f"preallocated KV cache full: {end} > {self.capacity} positions")
            rows = self.rows
            self._keys[:rows, :, self.length : end] = key_states
            self._values[:rows, :, self.length : end] = value_states
            self.length = end
            self.keys, self.values = self._keys[:rows, :, :end], self._values[:rows, :, :end]
            return self.keys, self.values

        def compact(self, moves, rows: int) -> None:
            """Keep the first ``rows`` rows after copying row ``src`` into row ``dst`` for each
            ``(dst, src)`` of ``moves`` (filled positions only): finished rows leave the batch without
            a new buffer, and the rows after them cost nothing more."""
            for dst, src in moves:
                self._keys[dst, :, : self.length] = self._keys[src, :, : self.length]
                self._values[dst, :, : self.length] = self._values[src, :, : self.length]
            self.rows = int(rows)
            self.keys = self._keys[: self.rows, :, : self.length]
            self.values = self._values[: self.rows, :, : self.length]

        def add_rows(self, other: PreallocatedLayer) -> None:
            """Append ``other``'s rows (a prefill of new prompts, ``other.length <= self.length``) after
            this layer's rows, right-aligned on the filled length: the columns before their prompt are
            zeros, which the attention mask hides (continuous batching: waiting rows join a batch)."""
            n, start = other.rows, self.length - other.length
            if start < 0 or self.rows + n > self._keys.shape[0]:
                raise RuntimeError("preallocated KV cache: the new rows do not fit")
            rows = slice(self.rows, self.rows + n)
            self._keys[rows, :, :start] = 0
            self._values[rows, :, :start] = 0
            self._keys[rows, :, start : self.length] = other._keys[:n, :, : other.length]
            self._values[rows, :, start : self.length] = other._values[:n, :, : other.length]
            self.compact((), self.rows + n)

        def regrow(self, capacity: int, shift: int, arena: Optional[_Arena] = None) -> None:
            """New buffers of ``capacity`` positions (from ``arena``, shared by the cache's layers, see
            :func:`regrow`) holding the filled part moved right by ``shift`` columns (zeros in front)
            or, with a negative ``shift``, without its first ``-shift`` columns (ones the mask hides in
            every row)."""
            keep = self._keys[:, :, max(0, -shift) : self.length]
            end = keep.shape[2] + max(0, shift)
            if end > capacity:
                raise RuntimeError(f"preallocated KV cache: {end} positions do not fit in {capacity}")
            kshape = (self._keys.shape[0], self._keys.shape[1], capacity, self._keys.shape[3])
            vshape = (self._values.shape[0], self._values.shape[1], capacity, self._values.shape[3])
            got = arena.take(kshape, vshape, self._keys) if arena is not None else None
            keys, values = got if got is not None else (self._keys.new_empty(kshape), self._values.new_empty(vshape))
            keys[:, :, : max(0, shift)] = 0
            values[:, :, : max(0, shift)] = 0
            keys[:, :, end:] = 0
            values[:, :, end:] = 0
            self.arena = arena
            keys[:, :, max(0, shift) : end] = keep
            values[:, :, max(0, shift) : end] = self._values[:, :, max(0, -shift) : self.length]
            self._keys, self._values, self.capacity, self.length = keys, values, int(capacity), end
            self.compact((), self.rows)

        def get_seq_length(self) -> int:
            return self.length

        def reset(self) -> None:
            self.length = 0
            super().reset()

        def crop(self, tokens_to_remove: int) -> None:
            raise NotImplementedError("a preallocated cache layer is not cropped")

        def batch_repeat_interleave(self, repeats: int) -> None:
            raise NotImplementedError("a preallocated cache layer is not repeated")

        def batch_select_indices(self, indices) -> None:
            raise NotImplementedError("a preallocated cache layer keeps its rows")


class _Arena:
    """One block holding the keys and values of every layer of a cache, allocated at the first layer's
    first update (the shapes are known then) and handed out in slices, layer after layer.

    One block instead of two per layer, because of how the C allocator returns memory: glibc serves a
    block above its mmap threshold with its own mapping, which ``free`` gives back to the OS at once,
    but it raises that threshold (up to 32 MB) whenever such a block is freed, so that later per-layer
    buffers of a few MB come from the heap, which keeps the process's RSS after the cache is gone (and
    the next cache of another shape lands beside it). On a CPU the block is an anonymous mapping made
    here (:func:`_block`), outside the allocator: released when the call ends, and without raising the
    threshold for the rest of the process (a 190 MB block freed by glibc raised it to 32 MB, and the
    distillation and check stages after it peaked 0.17 GB higher)."""

    def __init__(self, layers: int):
        self.layers = int(layers)
        self.block = None
        self.offset = 0

    def take(self, kshape: tuple, vshape: tuple, like) -> Optional[tuple]:
        """The next layer's (keys, values) buffers, or ``None`` where this layer does not fit the block
        (a layer of another shape or dtype than the first: it allocates its own)."""
        import math

        kn, vn = math.prod(kshape), math.prod(vshape)
        if self.block is None:
            self.block = _block(self.layers * (kn + vn), like)
        if self.block.dtype != like.dtype or self.offset + kn + vn > self.block.numel():
            return None
        keys = self.block[self.offset : self.offset + kn].view(kshape)
        values = self.block[self.offset + kn : self.offset + kn + vn].view(vshape)
        self.offset += kn + vn
        return keys, values


def _block(n: int, like) -> Any:
    """``n`` elements of ``like``'s dtype and device; on a CPU an anonymous mapping of its own, outside
    the C allocator: unmapped when the last tensor viewing it is gone, and its ``free`` does not raise
    glibc's mmap threshold (which would move later activations of up to 32 MB into the heap)."""
    import mmap

    import torch

    if like.device.type != "cpu" or n == 0:
        return like.new_empty(n)
    buf = mmap.mmap(-1, n * like.element_size())
    return torch.frombuffer(buf, dtype=like.dtype, count=n)


def base_forward_accepts(model: Any, name: str) -> bool:
    """Whether the causal LM under ``model`` (a PEFT wrapper's base model too) takes ``name`` in forward."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return name in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def preallocated_cache(model: Any, capacity: int) -> Optional[Any]:
    """A dynamic cache of ``capacity`` positions per row that is never copied, or ``None`` where it
    would not be exactly the dynamic cache (see the module's docstring)."""
    if DynamicCache is None:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        cache = DynamicCache(config=base.config)
    except TypeError:
        return None
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    arena = _Arena(len(layers))
    cache.layers = [PreallocatedLayer(capacity, arena) for _ in layers]
    return cache


def regrow(cache: Any, capacity: int, shift: int) -> None:
    """Every layer of a preallocated ``cache`` into new buffers of ``capacity`` positions (one new
    block for all of them), the filled part shifted by ``shift`` (:meth:`PreallocatedLayer.regrow`); the
    old block is released once every layer has moved."""
    arena = _Arena(len(cache.layers))
    for layer in cache.layers:
        layer.regrow(capacity, shift, arena)


def cache_kwargs(model: Any, cache: Optional[Any]) -> dict:
    """``generate``'s keyword for a cache this ``transformers`` names it (``cache`` from 5.x, before
    ``past_key_values``); empty without a cache."""
    if cache is None:
        return {}
    return {"cache" if base_forward_accepts(model, "cache") else "past_key_values": cache}
