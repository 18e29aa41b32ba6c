"""In-process Hugging Face engine: batched generation with left padding and log-prob scoring."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

from ..errors import PrismError
from ..models import encode_prompts, load_model, render_chat, resolve_model
from ..options import option
from ..progress import progress
from . import EngineSpec
from .base import Completion, Engine, SamplingParams, choice_token_ids

log = logging.getLogger(__name__)


class HFEngine(Engine):
    """Generation and scoring with a ``transformers`` causal LM held in this process.

    Rows are sorted by prompt length before batching (less padding), generated in batches of
    ``batch_size`` rows -- fewer where rows x (longest prompt + new tokens) would pass ``batch_tokens``
    (:meth:`rows_for`: the cache and the prefill's activations grow with it) -- with left padding, and
    returned in the caller's order. Each batch decodes into a
    KV cache allocated once for its prompt + new tokens
    (:func:`~prism_persona.engines.kv_cache.preallocated_cache`: generate's dynamic cache copies
    itself at every step).

    The engine runs its own decode loop (:meth:`_decode`, :meth:`_stream`) with ``generate``'s
    forward calls and token choice, so the tokens are ``generate``'s, but a row stops *inside* the loop
    at EOS, at its budget or as soon as its text holds a stop string, and a stopped row leaves the
    batch (it costs nothing more). Calls with more chats than one batch stream through one cache:
    waiting prompts join the live rows as slots free up (:meth:`_stream`). Seeded sampling always
    streams, each row drawing its noise from its own generator (:func:`row_seed`), so a row's sample
    does not depend on the rows batched with it; greedy rows get ``generate``'s tokens. ``generate`` itself
    still runs for routed batches (``batch_context``), caches that cannot be preallocated, and models
    whose generation config adds logits processors.
    """

    name = "hf"
    supports_prefill = True

    refills_rows = True
    """A call's rows stream through one cache (a finished row's slot takes a waiting row): callers may
    pass several batches per call (``bootstrap.answers.chunk_size``)."""

    def __init__(
        self,
        model,
        tokenizer,
        batch_size: int = 8,
        quiet: bool = False,
        model_name: str = "",
        batch_tokens: Optional[int] = None,
        quantize: Optional[str] = None,
    ):
        self.quantize = HFOptions.__dataclass_fields__["hf_quantize"].default if quantize is None else quantize
        if self.quantize != "off":  # engine.hf_quantize: int8 linears in a copy sharing every other tensor (opt-in)
            from .quantize import quantized_copy

            model = quantized_copy(model, self.quantize)
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = max(1, int(batch_size))
        if batch_tokens is None:  # the setting's default: every in-process engine (the gated model's too) is bounded
            batch_tokens = HFOptions.__dataclass_fields__["hf_batch_tokens"].default
        self.batch_tokens = max(0, int(batch_tokens))  # 0: rows only (see rows_for)
        self.quiet = quiet
        self.model_name = model_name or getattr(model.config, "_name_or_path", "") or "model"
        self.tokens_generated = 0
        self.generate_seconds = 0.0

    @classmethod
    def load(
        cls,
        spec,
        dtype: str = "auto",
        device: str = "auto",
        batch_size: int = 8,
        quiet: bool = False,
        trust_remote_code: bool = False,
        batch_tokens: Optional[int] = None,
        quantize: Optional[str] = None,
    ) -> HFEngine:
        """Load the model ``spec`` names (embedded default, HF id, local dir, .gguf) into an engine."""
        src = resolve_model(spec)
        model, tok = load_model(src, dtype, device, trust_remote_code)
        return cls(
            model,
            tok,
            batch_size=batch_size,
            quiet=quiet,
            model_name=src.display,
            batch_tokens=batch_tokens,
            quantize=quantize,
        )

    @classmethod
    def from_config(cls, cfg) -> HFEngine:
        m = cfg.model
        return cls.load(
            m.model,
            m.dtype,
            m.device,
            m.batch_size,
            cfg.quiet,
            m.trust_remote_code,
            _option(cfg, "hf_batch_tokens"),
            _option(cfg, "hf_quantize"),
        )

    def rows_for(self, longest: int, new_tokens: int) -> int:
        """Rows of one batch whose longest prompt has ``longest`` tokens and that decodes ``new_tokens``:
        ``batch_size``, fewer where rows x (longest + new_tokens) would pass ``batch_tokens`` (the KV
        cache, ``rows x positions x layers``, and the prefill's activations grow with it), at least 1."""
        rows = self.batch_size
        if self.batch_tokens:
            rows = min(rows, self.batch_tokens // max(1, longest + new_tokens))
        return max(1, rows)

    def _batches(self, order: list[int], lengths: list[int], new_tokens: int) -> list[list[int]]:
        """``order`` (longest prompt first) cut into batches of :meth:`rows_for` rows each."""
        out, start = [], 0
        while start < len(order):
            rows = self.rows_for(lengths[order[start]], new_tokens)
            out.append(order[start : start + rows])
            start += rows
        return out

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _eos_ids(self) -> list[int]:
        ids = set()
        gc_eos = getattr(self.model.generation_config, "eos_token_id", None)
        for x in (gc_eos, self.tokenizer.eos_token_id):
            if isinstance(x, int):
                ids.add(x)
            elif isinstance(x, (list, tuple)):
                ids.update(int(i) for i in x)
        return sorted(ids)

    def generate(self, chats: Sequence[list], params: SamplingParams, desc: str = "generate") -> list[Completion]:
        return self.run_batches(chats, params, desc=desc)

    def run_batches(
        self,
        chats: Sequence[list],
        params: SamplingParams,
        desc: str = "generate",
        batch_context: Optional[Callable] = None,
    ) -> list[Completion]:
        """Generate in length-sorted, left-padded batches; results in the caller's order.

        ``batch_context(rows)`` (rows = indices into ``chats``), if given, is entered around each
        batch's ``model.generate`` and yields a function returning one ``meta`` dict per row of the
        batch; the gated model uses it to set and read the routing of each batch.
        """
        import torch

        from . import kv_cache

        if not chats:
            return []
        texts = [render_chat(self.tokenizer, c) for c in chats]
        order, lengths = self._longest_first(texts)
        batches = self._batches(order, lengths, params.max_new_tokens)
        out: list[Optional[Completion]] = [None] * len(texts)
        eos = self._eos_ids()
        kwargs = self._sampling_kwargs(params, eos)
        own_loop = batch_context is None and self._own_loop_exact(params)
        bar = progress(total=len(texts), desc=desc, disable=self.quiet, unit="seq")
        seeded = params.seed is not None and bool(params.temperature and params.temperature > 0)
        if own_loop and (seeded or len(batches) > 1):
            seeds = [row_seed(params.seed, i) for i in order] if seeded else None
            t0 = time.perf_counter()
            with torch.inference_mode():
                rows = self._stream([texts[i] for i in order], params, eos, bar, len(batches[0]), seeds)
            self.generate_seconds += time.perf_counter() - t0
            if rows is not None:
                for k, i in enumerate(order):
                    out[i] = self._completion(rows[k], eos, params)
                bar.close()
                return out  # type: ignore[return-value]
        for b, idx in enumerate(batches):
            enc = encode_prompts(self.tokenizer, [texts[i] for i in idx], self.device)
            if params.seed is not None:
                torch.manual_seed(params.seed + b)
            metas = None
            with torch.inference_mode(), batch_context(idx) if batch_context else contextlib.nullcontext() as read_meta:
                t0 = time.perf_counter()
                cache = kv_cache.preallocated_cache(self.model, enc["input_ids"].shape[1] + params.max_new_tokens)
                if own_loop and cache is not None:
                    rows = self._decode(enc, cache, params, eos)
                else:
                    gen = self.model.generate(**enc, **kwargs, **kv_cache.cache_kwargs(self.model, cache))
                    rows = gen[:, enc["input_ids"].shape[1] :].tolist()
                self.generate_seconds += time.perf_counter() - t0
                if read_meta is not None:
                    metas = read_meta()
            for row, i in enumerate(idx):
                out[i] = self._completion(rows[row], eos, params)
                if metas is not None:
                    out[i].meta = metas[row]
            bar.update(len(idx))
        bar.close()
        return out  # type: ignore[return-value]

    # Generation-config fields whose non-default values would make ``generate`` add logits processors
    # that :meth:`_decode` does not apply (those models keep ``generate``).
    _PLAIN_CONFIG = dict(
        repetition_penalty=1.0,
        encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        bad_words_ids=None,
        min_length=0,
        min_new_tokens=None,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
        suppress_tokens=None,
        begin_suppress_tokens=None,
        sequence_bias=None,
        renormalize_logits=False,
        remove_invalid_values=False,
        exponential_decay_length_penalty=None,
        guidance_scale=None,
        watermarking_config=None,
        top_h=None,
        min_p=None,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        num_beams=1,
    )

    def _own_loop_exact(self, params: SamplingParams) -> bool:
        """Whether :meth:`_decode` picks exactly ``generate``'s tokens for this model and ``params``:
        a generation config that adds no logits processor beyond temperature and top-p."""
        gc = getattr(self.model, "generation_config", None)
        if gc is None:
            return False
        for name, default in self._PLAIN_CONFIG.items():
            value = getattr(gc, name, default)
            if value not in (default, None) and not (isinstance(value, (list, tuple)) and not value):
                return False
        return True

    def _decode(self, enc, cache, params: SamplingParams, eos: list[int]) -> list[list[int]]:
        """``generate``'s tokens for one left-padded batch, with finished rows leaving the batch.

        The same forward calls as ``generate`` (prefill with ``cumsum(mask) - 1`` positions, then one
        token per step, last-position logits), the same token choice (argmax, or temperature then top-p
        then ``torch.multinomial``), but a row stops *inside* the loop at EOS, at its token budget or as
        soon as its text contains a stop string, and stopped rows leave the batch: the last live row
        moves into the freed slot of the cache (:meth:`PreallocatedLayer.compact`), so later steps
        compute only live rows. Sampling draws ``multinomial``'s noise for the whole batch at every
        step, as ``generate`` does, so every row's tokens are the ones ``generate`` samples for it.
        Returns each row's new tokens (EOS included when it stopped there)."""
        import torch

        from .kv_cache import base_forward_accepts, cache_kwargs

        model = self.model
        ids, mask = enc["input_ids"], enc["attention_mask"]
        batch = ids.shape[0]
        sample = bool(params.temperature and params.temperature > 0)
        warpers = self._warpers(params) if sample else []
        stops = [s for s in params.stop if s]
        eos_set = set(eos)
        extra = dict(cache_kwargs(model, cache), use_cache=True)
        if base_forward_accepts(model, "logits_to_keep"):
            extra["logits_to_keep"] = 1
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, **extra).logits[:, -1]
        pos = pos[:, -1:]
        live = list(range(batch))  # slot -> batch row
        new: list[list[int]] = [[] for _ in range(batch)]
        for step in range(params.max_new_tokens):
            scores = logits.to(dtype=torch.float32, copy=True)
            if sample:
                for w in warpers:
                    scores = w(None, scores)
                probs = torch.softmax(scores, dim=-1)
                # torch.multinomial(probs, 1) is argmax(probs / q) with q ~ Exp(1) of probs' shape; the
                # noise of the whole batch is drawn so that a live row gets generate's draw.
                noise = torch.empty((batch, probs.shape[-1]), dtype=probs.dtype, device=probs.device).exponential_(1)
                if len(live) < batch:
                    noise = noise[torch.tensor(live, device=probs.device)]
                token = (probs / noise).argmax(dim=-1)
            else:
                token = scores.argmax(dim=-1)
            done = []
            last = step + 1 == params.max_new_tokens
            for slot, t in enumerate(token.tolist()):
                row = live[slot]
                new[row].append(t)
                if last or t in eos_set or (stops and self._has_stop(new[row], stops)):
                    done.append(slot)
            if len(done) == len(live):
                break
            if done:
                live, token, mask, pos = _drop_rows(cache, done, live, token, mask, pos)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            pos = pos + 1
            logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=pos, **extra).logits[:, -1]
        return new

    def _stream(
        self,
        prompts: list[str],
        params: SamplingParams,
        eos: list[int],
        bar,
        size: int,
        seeds: Optional[list[int]] = None,
    ) -> Optional[list[list[int]]]:
        """Continuous batching of ``prompts`` (longest first) in one preallocated cache of ``size`` rows
        (:meth:`rows_for` of the longest prompt): rows stop inside the loop (EOS, budget, stop string)
        and leave the batch, and waiting prompts are prefilled and join it once half of the rows are
        free (or none is left), so the batch stays full. Greedy rows get ``generate``'s tokens (each
        row's tokens depend only on its prompt); unseeded sampling draws from torch's global generator;
        seeded sampling (``seeds``: one per prompt, :func:`row_seed`) draws each row's noise from its own
        generator, so a row's sample depends on its prompt and seed only -- not on the batch it shares,
        the batch size or the token budget. Returns each prompt's new tokens, or ``None`` where the
        cache is not preallocated."""
        import torch

        from . import kv_cache

        model, budget = self.model, params.max_new_tokens
        sample = bool(params.temperature and params.temperature > 0)
        warpers = self._warpers(params) if sample else []
        stops, eos_set = [s for s in params.stop if s], set(eos)
        extra: dict = {"use_cache": True}
        if kv_cache.base_forward_accepts(model, "logits_to_keep"):
            extra["logits_to_keep"] = 1
        new: list[list[int]] = [[] for _ in prompts]
        pending = list(range(len(prompts)))
        gens: dict[int, torch.Generator] = {}
        cache = None
        live: list[int] = []
        mask = pos = logits = None

        def prefill(idx: list[int], room: int):
            """The prompts ``idx`` run into a new cache of their length + ``room`` positions."""
            enc = encode_prompts(self.tokenizer, [prompts[i] for i in idx], self.device)
            c = kv_cache.preallocated_cache(model, enc["input_ids"].shape[1] + room)
            if c is None:
                return None
            m = enc["attention_mask"]
            p = (m.long().cumsum(-1) - 1).masked_fill(m == 0, 0)
            lg = model(
                input_ids=enc["input_ids"], attention_mask=m, position_ids=p, **extra, **kv_cache.cache_kwargs(model, c)
            )
            return c, m, p[:, -1:], lg.logits[:, -1]

        while pending or live:
            free = size - len(live)
            if pending and (not live or free >= min(len(pending), max(1, size // 2))):
                idx, pending = pending[:free], pending[free:]
                if not live:  # a fresh batch: all ``size`` rows (the cache's rows), or the last prompts
                    got = prefill(idx, budget)
                    if got is None:
                        return None
                    cache, mask, pos, logits = got
                    live = list(idx)
                else:  # waiting prompts join the live rows
                    small, m2, p2, l2 = prefill(idx, 0)
                    layer0 = cache.layers[0]
                    length, p_new = layer0.length, small.layers[0].length
                    if length < p_new or length + budget > layer0.capacity:
                        lead = int((mask.cumsum(-1) == 0).sum(-1).min())  # columns hidden in every live row
                        target = max(length - lead, p_new)
                        shift = target - length
                        # room for the budget and half again (fewer regrowths), within batch_tokens
                        capacity = target + budget + budget // 2
                        if self.batch_tokens:
                            capacity = max(target + budget, min(capacity, self.batch_tokens // size))
                        kv_cache.regrow(cache, capacity, shift)
                        mask = (
                            torch.cat([mask.new_zeros(mask.shape[0], shift), mask], 1)
                            if shift >= 0
                            else mask[:, -shift:]
                        )
                        length = target
                    for big, layer in zip(cache.layers, small.layers):
                        big.add_rows(layer)
                    m2 = torch.cat([m2.new_zeros(m2.shape[0], length - p_new), m2], 1)
                    mask, pos = torch.cat([mask, m2]), torch.cat([pos, p2])
                    logits = torch.cat([logits, l2])
                    live += idx
            scores = logits.to(dtype=torch.float32, copy=True)
            if sample:
                for w in warpers:
                    scores = w(None, scores)
                probs = torch.softmax(scores, dim=-1)
                if seeds is None:
                    token = torch.multinomial(probs, 1).squeeze(-1)
                else:  # multinomial(p, 1) = argmax(p / q), q ~ Exp(1), q drawn from the row's own generator
                    noise = torch.empty_like(probs)
                    for slot, row in enumerate(live):
                        if row not in gens:
                            gens[row] = torch.Generator(probs.device).manual_seed(seeds[row])
                        noise[slot].exponential_(1, generator=gens[row])
                    token = (probs / noise).argmax(dim=-1)
            else:
                token = scores.argmax(dim=-1)
            done = []
            for slot, t in enumerate(token.tolist()):
                row = live[slot]
                new[row].append(t)
                if len(new[row]) >= budget or t in eos_set or (stops and self._has_stop(new[row], stops)):
                    done.append(slot)
                    gens.pop(row, None)
            if done:
                bar.update(len(done))
                live, token, mask, pos = _drop_rows(cache, done, live, token, mask, pos)
            if not live:
                continue
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            pos = pos + 1
            out = model(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=pos,
                **extra,
                **kv_cache.cache_kwargs(model, cache),
            )
            logits = out.logits[:, -1]
        return new

    def _warpers(self, params: SamplingParams) -> list:
        """``generate``'s sampling warpers for ``params`` (temperature, then top-p; top-k off)."""
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        out = []
        if params.temperature != 1.0:
            out.append(TemperatureLogitsWarper(params.temperature))
        if params.top_p is not None and params.top_p < 1.0:
            out.append(SortedTopP(TopPLogitsWarper(top_p=params.top_p, min_tokens_to_keep=1)))
        return out

    def _has_stop(self, ids: list[int], stops: list[str]) -> bool:
        """Whether the text of ``ids`` contains a stop string. A trailing U+FFFD is left out: it is a
        character whose bytes have not all been generated yet, and may still become another one."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")
        return any(s in text for s in stops)

    def _longest_first(self, texts: Sequence[str]) -> tuple[list[int], list[int]]:
        """Indices of ``texts`` by decreasing token length (batches of similar lengths pad less), and
        each text's length in tokens."""
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
        lengths = [len(x) for x in ids]
        return sorted(range(len(texts)), key=lambda i: -lengths[i]), lengths

    def _sampling_kwargs(self, params: SamplingParams, eos: list[int]) -> dict:
        kwargs = dict(
            max_new_tokens=params.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id, eos_token_id=eos or None
        )
        if params.temperature and params.temperature > 0:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs

    def _completion(self, ids: list[int], eos: list[int], params: SamplingParams) -> Completion:
        finish = "length"
        n = len(ids)
        for j, t in enumerate(ids):
            if t in eos:
                n, finish = j, "stop"
                break
        self.tokens_generated += n + (1 if finish == "stop" else 0)
        text = self.tokenizer.decode(ids[:n], skip_special_tokens=True)
        for s in params.stop:
            cut = text.find(s)
            if s and cut >= 0:
                text, finish = text[:cut], "stop"
        return Completion(text=text.strip(), num_tokens=n, finish_reason=finish)

    def choice_token_ids(self, choice: str) -> list[int]:
        return choice_token_ids(self.tokenizer, choice)

    def score_choices(self, chats: Sequence[list], choices: Sequence[str]) -> list[dict]:
        """log P(first token of each choice) after the generation prompt; a choice's spellings with
        and without a leading space are pooled (log-sum-exp). Prompts run in length-sorted batches and
        the LM head only on the last position (``logits_to_keep=1``: the judge's prompts are long, and
        logits for every position were a fifth of the work and ``batch x length x vocab`` floats)."""
        import torch

        from .kv_cache import base_forward_accepts

        texts = [render_chat(self.tokenizer, c) for c in chats]
        choice_ids = {c: self.choice_token_ids(c) for c in choices}
        last_only = {"logits_to_keep": 1} if base_forward_accepts(self.model, "logits_to_keep") else {}
        order, lengths = self._longest_first(texts)
        out: list[dict] = [{} for _ in texts]
        for idx in self._batches(order, lengths, 0):
            enc = encode_prompts(self.tokenizer, [texts[i] for i in idx], self.device)
            with torch.inference_mode():
                logits = self.model(**enc, **last_only).logits[:, -1, :].float()
            logp = torch.log_softmax(logits, dim=-1)
            for row, i in enumerate(idx):
                out[i] = {c: float(torch.logsumexp(logp[row, ids], dim=0)) for c, ids in choice_ids.items()}
        return out


def build(cfg, model=None, tokenizer=None) -> HFEngine:
    """The in-process engine of ``cfg``, on ``model``/``tokenizer`` when they are already loaded."""
    if model is None:
        return HFEngine.from_config(cfg)
    m = cfg.model
    return HFEngine(
        model,
        tokenizer,
        batch_size=m.batch_size,
        quiet=cfg.quiet,
        model_name=resolve_model(m.model).display,
        batch_tokens=_option(cfg, "hf_batch_tokens"),
        quantize=_option(cfg, "hf_quantize"),
    )


def _option(cfg, name: str):
    """``engine.<name>`` of ``cfg``; ``None`` (the setting's default) for a config without an engine block."""
    return getattr(getattr(cfg, "engine", None), name, None)


@dataclass
class HFOptions:
    """The in-process engine's own settings: ``engine.hf_*`` keys of a run config."""

    hf_batch_tokens: int = option(
        4096,
        "Token budget of one in-process generation / scoring batch (engine=hf): rows x (longest prompt + new tokens) stays within it, so the KV cache (rows x positions x layers; ~46 kB a token for the embedded model) and the prefill's activations are bounded; model.batch_size still caps the rows. 0 = rows only.",
        at_least=0,
        at_most=1 << 20,
    )
    hf_quantize: str = option(
        "off",
        "Int8 linear layers in the in-process engine (engine=hf; CPU, float32 model; opt-in: outputs change). "
        "int8-dynamic = int8 weights and activations (torch.ao dynamic quantization; the MLP's down_proj stays "
        "fp32): on SmolLM2-135M's answers stage 1.6-1.7x the fp32 tokens per CPU second, but only the first "
        "~8-10 tokens of a row match fp32's on average, and a row's output depends on the rows batched with it. "
        "The engine runs a copy of the model's linears; "
        "training and the gated model stay fp32. Numbers: docs/performance.md.",
        choices=("off", "int8-dynamic"),
    )


def check(cfg) -> None:
    resolve_model(cfg.model.model)
    mode, m = _option(cfg, "hf_quantize"), cfg.model
    if mode not in (None, "off") and (m.device not in ("auto", "cpu") or m.dtype not in ("auto", "float32", "fp32")):
        raise PrismError(f"engine.hf_quantize={mode} needs model.device cpu and model.dtype float32 (int8 CPU kernels)")


class SortedTopP:
    """``transformers``' ``TopPLogitsWarper`` (nucleus filter), with the same result, 15-20x cheaper
    on a CPU.

    The warper sorts every row of ``batch x vocab`` logits with ``torch.sort`` (on the answers stage's
    sampling a third of a decode step's CPU time) and removes the ascending prefix whose cumulative
    softmax is ``<= 1 - top_p``. Only the sorted *values* decide that prefix, and they are the same
    whichever sort produced them, so numpy's vectorised sort gives the same cumulative sums; a token is
    then removed exactly when its logit is below the first kept value. A row whose last removed and
    first kept values tie (where the sort's order of equal values decides) goes through the warper
    itself."""

    def __init__(self, warper):
        self.warper = warper
        self.top_p = warper.top_p

    def __call__(self, input_ids, scores):
        import numpy as np
        import torch

        if scores.device.type != "cpu" or scores.dtype != torch.float32:
            return self.warper(input_ids, scores)
        values = torch.from_numpy(np.sort(scores.numpy(), axis=-1))
        remove = values.softmax(dim=-1).cumsum(dim=-1) <= (1 - self.top_p)
        remove[..., -1:] = False
        k = remove.sum(dim=-1, keepdim=True)  # a prefix: the cumulative sums never decrease
        first_kept = values.gather(1, k)
        out = scores.masked_fill(scores < first_kept, self.warper.filter_value)
        tie = (k > 0) & (values.gather(1, (k - 1).clamp(min=0)) == first_kept)
        for row in tie[:, 0].nonzero()[:, 0].tolist():
            out[row] = self.warper(input_ids, scores[row : row + 1])[0]
        return out


def row_seed(seed: int, index: int) -> int:
    """The sampling seed of row ``index`` (the caller's order) of a call seeded with ``seed``."""
    return (int(seed) * 1_000_003 + int(index)) % (1 << 63)


def _compaction(rows: int, done: list[int]) -> tuple[list[tuple[int, int]], list[int]]:
    """Moves ``(dst, src)`` that fill the ``done`` slots of ``rows`` with live slots from the end, and
    the slots kept, in their new order (slot ``k`` of the compacted batch was slot ``keep[k]``)."""
    gone = set(done)
    left = rows - len(gone)
    holes = [s for s in sorted(gone) if s < left]
    movers = [s for s in range(left, rows) if s not in gone]
    keep = list(range(left))
    for dst, src in zip(holes, movers):
        keep[dst] = src
    return list(zip(holes, movers)), keep


def _drop_rows(cache, done: list[int], live: list[int], *tensors):
    """Stopped rows leave the batch: the cache's ``done`` slots are filled with live rows from the end
    (:func:`_compaction`), and ``live`` (slot -> row) and the per-row ``tensors`` follow the same order.
    Returns ``(live, *tensors)``."""
    import torch

    moves, keep = _compaction(len(live), done)
    for layer in cache.layers:
        layer.compact(moves, len(keep))
    index = torch.tensor(keep, dtype=torch.long, device=tensors[0].device)
    return ([live[k] for k in keep], *(t[index] for t in tensors))


ENGINE = EngineSpec("hf", build, in_process=True, shares_model=True, gated_model=True, check=check, options=HFOptions)
