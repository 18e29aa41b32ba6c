"""The lm-evaluation-harness backend: any lm-eval task on a PRISM artifact, routed per request.

::

    prism-lm-eval --model prism --model_args artifact=RUN/prism,system=prism --device cpu \
        --tasks mmlu --apply_chat_template
    python -m prism_persona.evals.lmeval ...same arguments...

``prism-lm-eval`` (or ``python -m prism_persona.evals.lmeval``) is lm-eval's own command line with the
``prism`` model registered: lm-eval 0.4 has no plugin discovery for third-party models, so the stock
``lm_eval`` command only knows ``prism`` in a process that imported this module. In Python::

    import prism_persona.evals.lmeval  # registers "prism"
    lm_eval.simple_evaluate(model="prism", model_args="artifact=RUN/prism,system=prism", tasks=[...])

``model_args``:

* ``artifact=RUN/prism`` -- the PRISM artifact (needed for lora and prism; base uses its base model);
* ``pretrained=MODEL`` -- for ``system=base`` without an artifact (an HF id/path or ``embedded``);
* ``system=`` ``base`` (adapter off) | ``persona`` (adapter off, a persona as system message: needs
  ``--apply_chat_template`` and ``persona_file=JSON`` + ``domain=NAME``) | ``lora`` (adapter always on) |
  ``prism`` (the gate decides, per request). ``oracle`` has no meaning here: it needs a judge's verdict
  per item, which an LM interface never sees (``prism eval`` computes it);
* ``threshold=`` -- override the artifact's gate threshold; ``dtype``, ``max_length`` (``--device``
  and ``--batch_size`` are lm-eval's own flags); ``routing_file=PATH`` -- write the routing report (JSON) after every call.

Routing: every request is routed by the gate on **its own context** -- the layer-0 states of the
context pooled as the artifact's gate was trained (``gate_config.json`` ``pooling``: the mean over the
prompt by default, the last token for the paper's gate), exactly what the gate reads inside a prefill
(for ``loglikelihood_rolling``, which has no context, the text itself). All continuations of a request share that decision. With
``--apply_chat_template`` the context is the chat-rendered prompt ending in the generation prompt,
the same text ``prism generate`` routes on; without it the gate reads raw task text, which it was
not trained on. The routed share is logged after every call and kept per task and request type in
:attr:`PrismLM.routing` (and ``routing_file``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from ..errors import PrismError

log = logging.getLogger(__name__)

SYSTEMS = ("base", "persona", "lora", "prism")
FORCE = {"base": False, "persona": False, "lora": True, "prism": None}


def _check_model_args(device, threshold, max_length) -> tuple[Optional[float], Optional[int]]:
    """One-line errors for ``--model_args`` values, before any model loads; returns (threshold,
    max_length) as numbers."""
    from ..config import check_device

    check_device(str(device), "model_args device")
    return (
        _model_arg(threshold, "threshold", float, at_least=0, at_most=1),
        _model_arg(max_length, "max_length", int, at_least=1),
    )


def _model_arg(value, name: str, kind: type, **bounds):
    from ..options import bound_error

    if value is None or value == "":
        return None
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise PrismError(
            f"model_args {name} must be {'an integer' if kind is int else 'a number'}, got {value!r}"
        ) from None
    problem = bound_error(number, bounds)
    if problem:
        raise PrismError(f"model_args {name} {problem}, got {value!r}")
    return number


@register_model("prism")
class PrismLM(TemplateLM):
    """lm-eval ``LM`` over a :class:`~prism_persona.gated.model.GatedModel` (or a plain base model)."""

    def __init__(
        self,
        artifact: Optional[str] = None,
        system: str = "prism",
        pretrained: Optional[str] = None,
        batch_size: int | str = 8,
        device: str = "auto",
        dtype: str = "auto",
        max_length: Optional[int] = None,
        threshold: Optional[float] = None,
        persona_file: Optional[str] = None,
        domain: Optional[str] = None,
        routing_file: Optional[str] = None,
        **unused,
    ):
        super().__init__()
        if unused:
            log.info("prism: ignoring model_args %s", ", ".join(sorted(unused)))
        self.system = _check_system(system, artifact)
        threshold, max_length = _check_model_args(device, threshold, max_length)
        auto = str(batch_size).startswith("auto")  # lm-eval's --batch_size auto / auto:N
        self.batch_size_per_gpu = (
            8 if auto else _model_arg(batch_size, "batch_size", int, at_least=1, at_most=65_536) or 8
        )
        self.gm, model, tok = _load(artifact, pretrained, device, dtype, self.system)
        self.model, self.tokenizer = model, tok
        self.threshold = threshold if threshold is not None else (self.gm.threshold if self.gm else 0.5)
        self._max_length = max_length or _model_max_length(model)
        self.persona = _persona_text(persona_file, domain) if self.system == "persona" else None
        self.routing_file = routing_file
        self.routing: dict = {}
        self._chat_templated = False
        self._last_routed: list = []
        self._last_abstained: list = []  # per context of the last route(): the gate abstained (gates with a region)
        self.artifact = artifact
        self._device = model.device

    # ------------------------------------------------------------------------------ lm-eval plumbing

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "prism")).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> Optional[str]:
        return getattr(self.tokenizer, "chat_template", None) or ""

    def apply_chat_template(self, chat_history: list, add_generation_prompt: bool = True) -> str:
        from ..models import render_chat, with_persona

        self._chat_templated = True
        chat = [dict(m) for m in chat_history]
        if self.persona:
            chat = with_persona(chat, self.persona, "system")
        return render_chat(self.tokenizer, chat, add_generation_prompt=add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        # rendered chat prompts already hold any BOS token (as prism eval encodes them)
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    # ------------------------------------------------------------------------------ routing

    def _needs_chat(self) -> None:
        if self.system == "persona" and not self._chat_templated:
            raise PrismError(
                "system=persona puts the persona in a system message: run lm-eval with --apply_chat_template"
            )

    def route(self, contexts: Sequence[Sequence[int]]) -> tuple[list[Optional[float]], list]:
        """(gate probability, routed) per token context: the gate's own feature of the context (layer-0
        states pooled as the artifact's gate was trained, :func:`~prism_persona.gated.features.prompt_features`).

        A K-way artifact (one adapter per persona): ``routed`` is the persona's name where routed (False
        elsewhere), and each forward is forced to that persona's adapter, so the persona is the one the
        context picks (``system=lora``: the context's most probable persona on every request)."""
        force = FORCE[self.system]
        kway = self.gm is not None and self.gm.gate.personas > 1
        self._last_abstained = []
        if self.gm is None or force is False or (force is True and not kway):
            return [None] * len(contexts), [bool(force)] * len(contexts)
        import torch

        from ..gated.features import prompt_features
        from ..gated.gate import decide, persona_choice

        probs: list[float] = []
        routed: list = []
        for start in range(0, len(contexts), self.batch_size_per_gpu):
            ids, mask = _pad(
                [list(c) for c in contexts[start : start + self.batch_size_per_gpu]], self._pad_id, left=True
            )
            feats = prompt_features(self.model, ids.to(self._device), mask.to(self._device), self.gm.gate.pooling)
            with torch.no_grad():
                d = decide(self.gm.gate, self.threshold, feats.float())  # the abstain rule included
            probs.extend(float(x) for x in d.probs.tolist())
            if force is None and self.gm.has_abstain:
                self._last_abstained.extend(bool(x) for x in d.abstained.tolist())
            if not kway:
                routed.extend(bool(x) for x in d.routed.tolist())
                continue
            on = torch.ones_like(d.routed) if force is True else d.routed
            names = self.gm.persona_names
            routed.extend(names[k] if k >= 0 else False for k in persona_choice(d.class_probs, on).tolist())
        return probs, routed

    def _context_tokens(self, context: str) -> list[int]:
        return self.tok_encode(context)[-self.max_length :] or [self.prefix_token_id]

    def _record(self, kind: str, requests, routed: Sequence) -> None:
        """Count the routed requests per task and request type (and per persona: ``routed`` holds a
        persona's name where a K-way artifact routed; and, for a gate that can abstain, the requests it
        abstained on: the probability said route, the context lay outside its region)."""
        held = self._last_abstained if len(self._last_abstained) == len(routed) else None
        for j, (req, r) in enumerate(zip(requests, routed)):
            task = getattr(req, "task_name", None) or "unknown"
            slot = self.routing.setdefault(task, {}).setdefault(kind, {"routed": 0, "n": 0})
            slot["routed"] += int(bool(r))
            slot["n"] += 1
            if held is not None:
                slot["abstained"] = slot.get("abstained", 0) + int(held[j])
            if isinstance(r, str):
                slot.setdefault("personas", {})[r] = slot.get("personas", {}).get(r, 0) + 1
        n, k = len(routed), sum(bool(r) for r in routed)
        if n:
            log.info(
                "prism (%s): routed %d/%d %s requests to the LoRA (%.1f%%)", self.system, k, n, kind, 100.0 * k / n
            )
        if self.routing_file:
            Path(self.routing_file).write_text(json.dumps(self.routing_report(), indent=2), encoding="utf-8")

    def routing_report(self) -> dict:
        """``{"system", "threshold", "overall": {routed, n, rate}, "tasks": {task: {kind: {...}}}}``; a
        K-way artifact's counts also hold ``personas``: ``{persona: requests routed to it}``; a gate that
        can abstain, ``abstained`` (requests its probability would route that went to the base model)."""
        total: dict = {"routed": 0, "n": 0}
        tasks = {}
        for task, kinds in self.routing.items():
            tasks[task] = {}
            for kind, s in kinds.items():
                tasks[task][kind] = dict(s, rate=s["routed"] / s["n"] if s["n"] else None)
                total["routed"] += s["routed"]
                total["n"] += s["n"]
                if "abstained" in s:
                    total["abstained"] = total.get("abstained", 0) + s["abstained"]
                for name, c in s.get("personas", {}).items():
                    total.setdefault("personas", {})[name] = total.get("personas", {}).get(name, 0) + c
        total["rate"] = total["routed"] / total["n"] if total["n"] else None
        return {
            "system": self.system,
            "artifact": self.artifact,
            "threshold": self.threshold,
            "overall": total,
            "tasks": tasks,
        }

    @property
    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else self.eot_token_id

    # ------------------------------------------------------------------------------ scoring

    def _logits(self, rows: list[list[int]], routed: Sequence):
        """Log-softmax over right-padded rows, each forward routed as ``routed`` says (a persona's name:
        that persona's adapter)."""
        import torch

        ids, mask = _pad(rows, self._pad_id, left=False)
        ids, mask = ids.to(self._device), mask.to(self._device)
        with torch.no_grad():
            if self.gm is not None:
                logits, _, _ = self.gm.forward_logits(ids, mask, force=list(routed))
            else:
                logits = self.model(input_ids=ids, attention_mask=mask).logits
        return torch.log_softmax(logits.float(), dim=-1)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        self._needs_chat()
        windows = []
        for _, ctx, cont in requests:
            inp = (list(ctx) + list(cont))[-(self.max_length + 1) :][:-1]
            windows.append((inp, len(cont)))
        # route on the context as the task wrote it: lm-eval moves its trailing whitespace (e.g. the
        # newline after a chat template's generation prompt) into the continuation, but the gate reads
        # the prompt's real last token, as in generation
        _, routed = self.route([self._context_tokens(pair[0]) for pair, _, _ in requests])
        self._last_routed = routed
        out: list[tuple[float, bool]] = []
        for start in range(0, len(windows), self.batch_size_per_gpu):
            chunk = windows[start : start + self.batch_size_per_gpu]
            logp = self._logits([w for w, _ in chunk], routed[start : start + len(chunk)])
            for row, ((inp, n), (_, _, cont)) in enumerate(zip(chunk, requests[start : start + len(chunk)])):
                first = len(inp) - n
                lp = logp[row, first : first + n]
                target = _tensor(list(cont)[-n:], lp.device)
                total = float(lp.gather(-1, target.unsqueeze(-1)).sum())
                greedy = bool((lp.argmax(-1) == target).all())
                out.append((total, greedy))
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        res = super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        self._record("loglikelihood", requests, self._last_routed)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        self._needs_chat()
        texts = [self.tok_encode(req.args[0]) for req in requests]
        _, routed = self.route([t[: self.max_length] or [self.prefix_token_id] for t in texts])
        out = []
        for tokens, r in zip(texts, routed):
            windows = [
                utils.make_disjoint_window(w)
                for w in utils.get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1
                )
            ]
            total = 0.0
            for start in range(0, len(windows), self.batch_size_per_gpu):
                chunk = windows[start : start + self.batch_size_per_gpu]
                logp = self._logits(
                    [list(c) + list(t[:-1]) if len(t) > 1 else list(c) for c, t in chunk], [r] * len(chunk)
                )
                for row, (ctx, tgt) in enumerate(chunk):
                    first = len(ctx) - 1
                    lp = logp[row, first : first + len(tgt)]
                    total += float(lp.gather(-1, _tensor(list(tgt), lp.device).unsqueeze(-1)).sum())
            out.append(total)
        self._record("loglikelihood_rolling", requests, routed)
        return out

    # ------------------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        import torch

        self._needs_chat()
        out: list[str] = []
        contexts = [self._context_tokens(req.args[0]) for req in requests]
        _, routed = self.route(contexts)
        for i, (req, ctx) in enumerate(zip(requests, contexts)):
            kwargs = dict(req.args[1] or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            ctx = ctx[-max(1, self.max_length - max_new) :]
            ids = _tensor(ctx, self._device).unsqueeze(0)
            mask = torch.ones_like(ids)
            with torch.no_grad():
                if self.gm is not None:
                    with self.gm.routing([routed[i]]):
                        gen = self.model.generate(
                            input_ids=ids,
                            attention_mask=mask,
                            max_new_tokens=max_new,
                            do_sample=False,
                            pad_token_id=self._pad_id,
                        )
                else:
                    gen = self.model.generate(
                        input_ids=ids,
                        attention_mask=mask,
                        max_new_tokens=max_new,
                        do_sample=False,
                        pad_token_id=self._pad_id,
                    )
            text = self.tok_decode(gen[0, ids.shape[1] :].tolist())
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        self._record("generate_until", requests, routed)
        return out


# --------------------------------------------------------------------------------------------------
# helpers


def _check_system(system: str, artifact: Optional[str]) -> str:
    s = (system or "prism").strip().lower()
    if s == "oracle":
        raise PrismError(
            "system=oracle needs a judge's verdict per item, which lm-eval never gives a model; "
            "use `prism eval --systems oracle` (MMLU, MT-Bench, safety)"
        )
    if s not in SYSTEMS:
        raise PrismError(f"unknown system '{system}'; choose from {', '.join(SYSTEMS)}")
    if s in ("lora", "prism", "persona") and not artifact:
        raise PrismError(f"system={s} needs artifact=RUN/prism")
    return s


def _load(artifact, pretrained, device, dtype, system):
    """(GatedModel or None, model, tokenizer)."""
    if artifact:
        from ..gated.model import GatedModel

        gm = GatedModel.from_pretrained(artifact, device=device, dtype=dtype)
        return gm, gm.model, gm.tokenizer
    from ..models import load_model

    model, tok = load_model(pretrained, dtype=dtype, device=device)
    model.eval()
    return None, model, tok


def _model_max_length(model) -> int:
    n = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    return min(n, 4096)


def _persona_text(persona_file: Optional[str], domain: Optional[str]) -> str:
    from .systems import load_persona_file

    if not persona_file or not domain:
        raise PrismError("system=persona needs persona_file=JSON and domain=NAME in --model_args")
    personas = load_persona_file(persona_file)
    if domain not in personas:
        raise PrismError(f"persona file {persona_file} has no domain '{domain}' (has: {', '.join(personas)})")
    v = personas[domain]
    return v.get("short") or next(iter(v.values()))


def _tensor(values, device):
    import torch

    return torch.tensor(values, dtype=torch.long, device=device)


def _pad(rows: list[list[int]], pad_id: int, left: bool):
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def main() -> None:
    """``prism-lm-eval``: lm-eval's command line with the ``prism`` model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    try:
        cli_evaluate()
    except PrismError as exc:
        print(f"prism-lm-eval: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
