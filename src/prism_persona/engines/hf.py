"""In-process Hugging Face engine: batched generation with left padding and log-prob scoring."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Optional

from ..models import encode_prompts, load_model, render_chat, resolve_model
from ..progress import progress
from . import EngineSpec
from .base import Completion, Engine, SamplingParams, choice_token_ids

log = logging.getLogger(__name__)


class HFEngine(Engine):
    """Generation and scoring with a ``transformers`` causal LM held in this process.

    Rows are sorted by prompt length before batching (less padding), generated in batches of
    ``batch_size`` with left padding, stopped at EOS, and returned in the caller's order. Each batch
    decodes into a KV cache allocated once for its prompt + new tokens
    (:func:`~prism_persona.engines.kv_cache.preallocated_cache`: generate's dynamic cache copies
    itself at every step), with the same tokens as ``generate``'s own cache.
    """

    name = "hf"
    supports_prefill = True

    def __init__(self, model, tokenizer, batch_size: int = 8, quiet: bool = False, model_name: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = max(1, int(batch_size))
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
    ) -> HFEngine:
        """Load the model ``spec`` names (embedded default, HF id, local dir, .gguf) into an engine."""
        src = resolve_model(spec)
        model, tok = load_model(src, dtype, device, trust_remote_code)
        return cls(model, tok, batch_size=batch_size, quiet=quiet, model_name=src.display)

    @classmethod
    def from_config(cls, cfg) -> HFEngine:
        m = cfg.model
        return cls.load(m.model, m.dtype, m.device, m.batch_size, cfg.quiet, m.trust_remote_code)

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
        order = self._longest_first(texts)
        out: list[Optional[Completion]] = [None] * len(texts)
        eos = self._eos_ids()
        kwargs = self._sampling_kwargs(params, eos)
        bar = progress(total=len(texts), desc=desc, disable=self.quiet, unit="seq")
        for b, start in enumerate(range(0, len(order), self.batch_size)):
            idx = order[start : start + self.batch_size]
            enc = encode_prompts(self.tokenizer, [texts[i] for i in idx], self.device)
            if params.seed is not None:
                torch.manual_seed(params.seed + b)
            metas = None
            with torch.inference_mode(), batch_context(idx) if batch_context else contextlib.nullcontext() as read_meta:
                t0 = time.perf_counter()
                cache = kv_cache.preallocated_cache(self.model, enc["input_ids"].shape[1] + params.max_new_tokens)
                gen = self.model.generate(**enc, **kwargs, **kv_cache.cache_kwargs(self.model, cache))
                self.generate_seconds += time.perf_counter() - t0
                if read_meta is not None:
                    metas = read_meta()
            new = gen[:, enc["input_ids"].shape[1] :]
            for row, i in enumerate(idx):
                out[i] = self._completion(new[row].tolist(), eos, params)
                if metas is not None:
                    out[i].meta = metas[row]
            bar.update(len(idx))
        bar.close()
        return out  # type: ignore[return-value]

    def _longest_first(self, texts: Sequence[str]) -> list[int]:
        """Indices of ``texts`` by decreasing token length (batches of similar lengths pad less)."""
        lengths = [len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        return sorted(range(len(texts)), key=lambda i: -lengths[i])

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
        order = self._longest_first(texts)
        out: list[dict] = [{} for _ in texts]
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
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
        model, tokenizer, batch_size=m.batch_size, quiet=cfg.quiet, model_name=resolve_model(m.model).display
    )


def check(cfg) -> None:
    resolve_model(cfg.model.model)


ENGINE = EngineSpec("hf", build, in_process=True, check=check)
