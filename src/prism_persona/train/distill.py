"""LoRA self-distillation: the model without the persona learns to answer as it does with it.

For every query whose persona answer won (label 1):

* teacher = the frozen base model WITH the persona (same placement as in the bootstrap) reading
  (query, persona answer);
* student = the same model + LoRA (decoder layers 1..L-1) WITHOUT the persona reading the same
  (query, persona answer).

The prompts differ in length, so the response is tokenised once and appended to both prompts: the
response tokens are the same ids in both sequences, at offsets ``t_start`` and ``s_start``. The logits
that predict response token ``j`` sit at position ``start + j - 1`` of each sequence.

Loss on response tokens only: ``kl`` = KL(teacher || student) over the teacher's top-k tokens (both
distributions renormalised over those k tokens, softened by the temperature, scaled by T^2), ``ce`` =
cross-entropy on the persona answer (sequence-level SFT on the answers that won), or ``kl+ce`` = both
(``kl + sft_weight * ce``). All of them are teacher-forced on the persona's bootstrap answer (the
sequence the judge preferred), not on the student's own samples (on-policy): that keeps the stage
one forward of teacher and student per batch, and trains on exactly the behaviour that won.

How long: ``epochs`` passes, raised until there are at least ``min_steps`` optimisation steps (at
most ``max_epochs``), so a run with few winning answers still trains long enough to move the LoRA.
With ``val_fraction`` > 0 a share of the examples is held out; after every epoch their KL is
measured, the best epoch's adapter is kept, and training stops after ``patience`` epochs without
improvement. Teacher and student share one model object: the teacher
runs with the adapter disabled, without gradients, in eval mode.

Speed and memory (docs/performance.md): the teacher's top-k logits are computed once per example
before the first step and cached in ``RUN/distill/teacher_topk`` (:class:`TeacherCache`), not once
per epoch; a step's batch is cut into micro-batches of at most ``micro_tokens`` padded tokens whose
losses are normalised by the whole batch's token counts, so their gradients add up to the batch's
while the activations held at once are one micro-batch's.

The stage is resumable: after every epoch the adapter, the optimizer state, the random number
generators' states, the step and the early-stopping state are saved in ``RUN/distill/checkpoint``; a
rerun continues from there bit-identically (the checkpoint holds tensors only and is read with
``weights_only=True``/safetensors: no pickled code runs), and a finished stage is not redone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from ..config import RunConfig
from ..models import decoder_layers, render_chat, user_chat, with_persona
from . import non_finite

log = logging.getLogger(__name__)

STAGE = "distill"


# --------------------------------------------------------------------------------------------------
# examples and alignment


@dataclass
class Example:
    """Token ids of one (teacher, student) pair; response = ``ids[start:start + n]`` in both."""

    key: str
    teacher: list
    student: list
    t_start: int
    s_start: int
    n: int
    retain: bool = False
    """A retain example: the base model's own answer to a query the persona did not win; the teacher
    is the base model (no persona, adapter off), only its KL term counts, weighted ``retain_weight``."""


def response_ids(tokenizer, answer: str, finished: bool = True) -> list[int]:
    """The persona answer's tokens, followed by the end-of-turn token when the answer really ended
    (so the student learns to stop there, and never to stop where the bootstrap cut an answer short)."""
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if finished and tokenizer.eos_token_id is not None:
        ids = ids + [int(tokenizer.eos_token_id)]
    return ids


def build_example(
    tokenizer,
    query: str,
    answer: str,
    persona: Optional[str],
    placement: str = "system",
    max_length: int = 1024,
    key: str = "",
    finished: bool = True,
) -> Optional[Example]:
    """Tokenise teacher (with persona) and student (without) prompts + the shared response tokens.

    The response is cut so the longer sequence fits ``max_length``; ``None`` if nothing is left.
    """
    chat = user_chat(query)
    t_prompt = tokenizer(render_chat(tokenizer, with_persona(chat, persona, placement)), add_special_tokens=False)[
        "input_ids"
    ]
    s_prompt = tokenizer(render_chat(tokenizer, chat), add_special_tokens=False)["input_ids"]
    resp = response_ids(tokenizer, answer, finished)
    n = min(len(resp), max_length - max(len(t_prompt), len(s_prompt)))
    if n < 1:
        return None
    resp = resp[:n]
    return Example(
        key=key, teacher=t_prompt + resp, student=s_prompt + resp, t_start=len(t_prompt), s_start=len(s_prompt), n=n
    )


def per_sample(records: Sequence[dict]) -> list[dict]:
    """One record per judged answer sample: a query answered several times (``answers.samples`` > 1,
    its record holds ``samples``) gives one record per sample with that sample's answers and label,
    so the distillation set is the winning persona samples and the retain set the others."""
    out = []
    for rec in records:
        if not rec.get("samples"):
            out.append(rec)
            continue
        for s in rec["samples"]:
            out.append(
                dict(
                    rec,
                    key=s["key"],
                    persona_answer=s["persona_answer"],
                    base_answer=s["base_answer"],
                    persona_finish=s.get("persona_finish", "stop"),
                    label=int(s["label"]),
                    winner=s.get("winner"),
                    samples=None,
                )
            )
    return out


def without_loops(records: Sequence[dict]) -> tuple[list, int]:
    """The records minus the winners whose persona answer loops (:func:`~prism_persona.text.is_loop`),
    and how many were dropped (logged): degenerate text is never distilled, whatever the judge said."""
    from ..text import is_loop

    kept, dropped = [], 0
    for rec in records:
        if int(rec.get("label", 0)) == 1 and is_loop(rec.get("persona_answer") or ""):
            dropped += 1
            continue
        kept.append(rec)
    if dropped:
        wins = sum(int(r.get("label", 0)) == 1 for r in records)
        log.warning(
            "distill: %d of %d winning answers loop (a phrase repeated 4+ times in a row) and are "
            "left out of the distillation set",
            dropped,
            wins,
        )
    return kept, dropped


def build_examples(tokenizer, records: Sequence[dict], max_length: int, teacher_persona: bool = True) -> list[Example]:
    """Examples for the records with label 1. ``teacher_persona=False`` drops the persona from the
    teacher (the reference implementation's bug, kept only to test that it is caught)."""
    out = []
    for rec in records:
        if int(rec.get("label", 0)) != 1:
            continue
        ex = build_example(
            tokenizer,
            rec["query"],
            rec["persona_answer"],
            rec.get("persona") if teacher_persona else None,
            rec.get("placement") or "system",
            max_length,
            rec.get("key", ""),
            finished=rec.get("persona_finish", "stop") != "length",
        )
        if ex is None:
            log.warning("distill: example %s has no room for its answer within max_length", rec.get("key"))
            continue
        out.append(ex)
    return out


def build_retain_examples(tokenizer, records: Sequence[dict], max_length: int, n: int, seed: int) -> list[Example]:
    """Up to ``n`` retain examples (:attr:`Example.retain`) from the records the persona did not win,
    chosen at random with ``seed``; their teacher and student prompts are both the bare query."""
    losers = [r for r in records if int(r.get("label", 0)) != 1 and r.get("base_answer")]
    random.Random(seed + 104729).shuffle(losers)
    out = []
    for rec in losers:
        if len(out) >= n:
            break
        ex = build_example(
            tokenizer,
            rec["query"],
            rec["base_answer"],
            None,
            "system",
            max_length,
            "retain:" + str(rec.get("key", "")),
            finished=rec.get("base_finish", "stop") != "length",
        )
        if ex is not None:
            ex.retain = True
            out.append(ex)
    return out


def collate(examples: Sequence[Example], side: str, pad_id: int, device) -> dict:
    """Right-padded batch of the teacher or student sequences plus the logit positions that predict
    each response token (``rows``, ``cols``) and the response token ids (``targets``)."""
    seqs = [getattr(e, side) for e in examples]
    starts = [e.t_start if side == "teacher" else e.s_start for e in examples]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    rows, cols, targets, retain = [], [], [], []
    for i, (s, st, e) in enumerate(zip(seqs, starts, examples)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        for j in range(e.n):
            rows.append(i)
            cols.append(st + j - 1)
            targets.append(s[st + j])
            retain.append(e.retain)
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "rows": torch.tensor(rows, device=device),
        "cols": torch.tensor(cols, device=device),
        "targets": torch.tensor(targets, device=device),
        "retain": torch.tensor(retain, device=device),
    }


def _causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def response_logits(model, batch: dict) -> torch.Tensor:
    """Logits ``[n_response_tokens, vocab]`` at the positions that predict the response tokens (the LM
    head runs on those positions only)."""
    lm = _causal_lm(model)
    hidden = lm.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state
    logits = lm.get_output_embeddings()(hidden[batch["rows"], batch["cols"]]).float()
    cap = getattr(lm.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def topk_kl(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    per_token: bool = False,
) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) on the teacher's top-k tokens, both renormalised
    over those k tokens at ``temperature``, times T^2 (``per_token``: one value per token, no mean)."""
    vals, idx = teacher_logits.float().topk(min(int(k), teacher_logits.shape[-1]), dim=-1)
    return cached_topk_kl(vals, idx, student_logits, temperature, per_token)


def cached_topk_kl(
    values: torch.Tensor,
    indices: torch.Tensor,
    student_logits: torch.Tensor,
    temperature: float = 1.0,
    per_token: bool = False,
) -> torch.Tensor:
    """:func:`topk_kl` from the teacher's top-k logits already taken (``values``, ``indices``: ``[n, k]``,
    as :func:`teacher_topk` returns and the teacher cache stores them)."""
    logp = torch.log_softmax(values.float() / temperature, dim=-1)
    logq = torch.log_softmax(student_logits.float().gather(-1, indices.long()) / temperature, dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1) * temperature**2
    return kl if per_token else kl.mean()


def teacher_examples(dcfg, examples: Sequence[Example]) -> list[Example]:
    """The examples whose loss reads the teacher: all of them with a KL term (``kl``, ``kl+ce``), the
    retain examples only with ``ce``."""
    return list(examples) if dcfg.loss != "ce" else [e for e in examples if e.retain]


def token_counts(examples: Sequence[Example]) -> tuple[int, int]:
    """(persona response tokens, retain response tokens) of a batch: the loss's denominators."""
    retain = sum(e.n for e in examples if e.retain)
    return sum(e.n for e in examples) - retain, retain


def distill_loss(
    model,
    examples: Sequence[Example],
    dcfg,
    pad_id: int,
    teacher=None,
    counts: Optional[tuple[int, int]] = None,
) -> torch.Tensor:
    """The loss of one batch (gradients flow into the student's LoRA only): on the persona's winning
    answers ``kl``, ``ce`` or ``kl + sft_weight * ce``; plus ``retain_weight`` x the mean KL(base ||
    student) on the retain examples' tokens (:func:`build_retain_examples`) when the batch has any.

    ``teacher``: a :class:`TeacherCache` to read the teacher's top-k from (only when the loss needs
    it), or the examples' top-k already read (one ``(values, indices)`` per example); ``None`` runs the
    teacher now. ``counts``: the (persona, retain) response
    tokens of the whole batch when ``examples`` is one micro-batch of it (:func:`micro_batches`): the
    micro-batches' losses then sum to the batch's loss, so their gradients add up to the batch's."""
    device = next(model.parameters()).device
    student = collate(examples, "student", pad_id, device)
    s_logits = response_logits(model, student)
    retain = student["retain"]
    persona = ~retain
    n_persona, n_retain = counts if counts is not None else token_counts(examples)
    zero = s_logits.sum() * 0.0
    loss = zero
    if dcfg.loss in ("ce", "kl+ce") and bool(persona.any()):
        ce = torch.nn.functional.cross_entropy(s_logits[persona], student["targets"][persona], reduction="sum")
        ce = ce / n_persona
        loss = loss + (ce if dcfg.loss == "ce" else float(dcfg.sft_weight) * ce)
    if dcfg.loss == "ce" and not bool(retain.any()):
        return loss
    if teacher is None:
        teacher = teacher_topk(model, examples, dcfg.top_k, pad_id)
    elif isinstance(teacher, TeacherCache):
        teacher = teacher.lookup(model, examples, pad_id)
    values = torch.cat([t[0] for t in teacher]).to(device)
    indices = torch.cat([t[1] for t in teacher]).to(device)
    kl = cached_topk_kl(values, indices, s_logits, dcfg.kl_temperature, per_token=True)
    if dcfg.loss in ("kl", "kl+ce") and bool(persona.any()):
        loss = loss + kl[persona].sum() / n_persona
    if bool(retain.any()):
        loss = loss + float(dcfg.retain_weight) * kl[retain].sum() / n_retain
    return loss


@torch.no_grad()
def teacher_topk(model, examples: Sequence[Example], k: int, pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The teacher's top-``k`` logits on each example's response tokens, one ``(values [n, k] float32,
    indices [n, k] int32)`` per example: the frozen base model (adapter off) reading the persona
    prompt, in eval mode (a teacher is deterministic), on the same weights as the student."""
    device = next(model.parameters()).device
    teacher = collate(examples, "teacher", pad_id, device)
    was_training = model.training
    model.eval()
    try:
        with _adapter_off(model):
            logits = response_logits(model, teacher)
    finally:
        if was_training:
            model.train()
    vals, idx = logits.topk(min(int(k), logits.shape[-1]), dim=-1)
    del logits
    out, start = [], 0
    for e in examples:
        out.append((vals[start : start + e.n].cpu().contiguous(), idx[start : start + e.n].to(torch.int32).cpu()))
        start += e.n
    return out


def micro_batches(examples: Sequence[Example], max_tokens: int, side: str = "student") -> list[list[Example]]:
    """``examples`` (one batch) cut, in order, into micro-batches whose padded size (rows x longest
    ``side`` sequence) stays within ``max_tokens``, one example at least each; ``0`` keeps the batch
    whole. A step's activation memory follows the micro-batch; its gradient does not."""
    if max_tokens <= 0:
        return [list(examples)] if examples else []
    out: list[list[Example]] = []
    width = 0
    for e in examples:
        n = len(getattr(e, side))
        if out and (len(out[-1]) + 1) * max(width, n) <= max_tokens:
            out[-1].append(e)
            width = max(width, n)
        else:
            out.append([e])
            width = n
    return out


class TeacherCache:
    """The teacher's top-k logits of every example, computed once per run instead of once per epoch.

    One file per example, ``DIR/<hash of the teacher's token ids, the response span and k>.safetensors``
    holding ``values`` (float32, ``[n, k]``) and ``indices`` (int32), written to a temporary name and
    renamed (a ``kill -9`` leaves whole files only: a resumed run recomputes at most the micro-batch
    that was running). ``directory=None`` keeps them in memory (benchmarks, tests). The files are
    tensors only (safetensors): reading them runs no code. They live in ``RUN/distill``, so
    ``--redo distill`` (and settings that changed, refused by the stage's settings check) never reuse
    a stale teacher."""

    def __init__(self, directory: Optional[Path], k: int):
        self.dir = Path(directory) if directory is not None else None
        self.k = int(k)
        self.mem: dict[str, tuple] = {}
        self.computed = 0
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    def key(self, e: Example) -> str:
        import hashlib

        blob = json.dumps([e.teacher, e.t_start, e.n, self.k]).encode()
        return hashlib.sha256(blob).hexdigest()[:32]

    def _path(self, e: Example) -> Path:
        assert self.dir is not None
        return self.dir / f"{self.key(e)}.safetensors"

    def has(self, e: Example) -> bool:
        return self.key(e) in self.mem if self.dir is None else self._path(e).is_file()

    def get(self, e: Example) -> Optional[tuple]:
        if self.dir is None:
            return self.mem.get(self.key(e))
        path = self._path(e)
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        try:
            t = load_file(str(path))
            vals, idx = t["values"].clone(), t["indices"].clone()  # not a view of the mapped file
        except Exception as exc:  # a damaged file is recomputed, never trusted
            log.warning(
                "distill: teacher cache file %s is unreadable (%s); recomputing it", path.name, type(exc).__name__
            )
            return None
        if vals.dim() != 2 or int(vals.shape[0]) != e.n or vals.shape != idx.shape:
            log.warning("distill: teacher cache file %s does not fit its example; recomputing it", path.name)
            return None
        return vals, idx

    def put(self, e: Example, topk: tuple) -> None:
        self.computed += 1
        if self.dir is None:
            self.mem[self.key(e)] = topk
            return
        import os

        from safetensors.torch import save_file

        path = self._path(e)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file({"values": topk[0].contiguous(), "indices": topk[1].contiguous()}, str(tmp))
        os.replace(tmp, path)

    def fill(self, model, examples: Sequence[Example], pad_id: int, max_tokens: int) -> int:
        """Compute and store the top-k of the examples not cached yet (micro-batches of ``max_tokens``
        padded teacher tokens); returns how many were computed."""
        todo = [e for e in examples if not self.has(e)]
        self._compute(model, todo, pad_id, max_tokens)
        if todo:
            log.info("distill: teacher top-%d logits of %d examples computed once, for every epoch", self.k, len(todo))
        return len(todo)

    def _compute(self, model, examples: Sequence[Example], pad_id: int, max_tokens: int) -> None:
        for group in micro_batches(examples, max_tokens, "teacher"):
            for e, topk in zip(group, teacher_topk(model, group, self.k, pad_id)):
                self.put(e, topk)

    def lookup(self, model, examples: Sequence[Example], pad_id: int) -> list[tuple]:
        """The examples' cached top-k, computing (and storing) the missing or unreadable ones."""
        out = [self.get(e) for e in examples]
        missing = [e for e, t in zip(examples, out) if t is None]
        if missing:
            self._compute(model, missing, pad_id, 0)
            out = [self.get(e) for e in examples]
        return out


@torch.no_grad()
def heldout_kl(
    model, examples: Sequence[Example], dcfg, pad_id: int, cache: Optional[TeacherCache] = None
) -> Optional[float]:
    """Mean KL(teacher || student) over held-out examples (the early-stopping signal), eval mode."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    kl_cfg = _KLOnly(dcfg)
    bs = max(1, int(dcfg.batch_size))
    total, n = 0.0, 0
    for i in range(0, len(examples), bs):
        batch = list(examples[i : i + bs])
        tokens = sum(e.n for e in batch)
        total += float(distill_loss(model, batch, kl_cfg, pad_id, cache)) * tokens
        n += tokens
    if was_training:
        model.train()
    return total / max(1, n)


class _KLOnly:
    """``dcfg`` seen with ``loss = kl`` (the held-out signal is the KL whatever the training loss)."""

    def __init__(self, dcfg):
        self._dcfg = dcfg
        self.loss = "kl"

    def __getattr__(self, name):
        return getattr(self._dcfg, name)


class _adapter_off:
    """``with _adapter_off(model)``: the frozen base model (PEFT's ``disable_adapter``) or a no-op."""

    def __init__(self, model):
        self.ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else None

    def __enter__(self):
        return self.ctx.__enter__() if self.ctx is not None else None

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc) if self.ctx is not None else False


# --------------------------------------------------------------------------------------------------
# LoRA


def lora_targets(model, dcfg) -> list:
    """The ``distill.target_modules`` this model has (a warning names the missing ones; none at all is a
    one-line error - checked as soon as the model is loaded, before the bootstrap)."""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = [t for t in dcfg.target_modules if t in names]
    missing = sorted(set(dcfg.target_modules) - set(targets))
    if missing and targets:
        log.warning("distill: the model has no %s layers; LoRA goes on %s", ", ".join(missing), ", ".join(targets))
    if not targets:
        from ..errors import PrismError

        raise PrismError(
            f"none of the LoRA target modules {dcfg.target_modules} exist in this model; set distill.target_modules"
        )
    return targets


def lora_config(model, dcfg):
    """PEFT LoRA on decoder layers 1..L-1 only (layer 0 feeds the gate and must stay the base's)."""
    from peft import LoraConfig

    n_layers = len(decoder_layers(model))
    return LoraConfig(
        r=int(dcfg.r),
        lora_alpha=int(dcfg.alpha),
        lora_dropout=float(dcfg.dropout),
        target_modules=lora_targets(model, dcfg),
        layers_to_transform=list(range(1, n_layers)),
        task_type="CAUSAL_LM",
        bias="none",
    )


def attach_lora(model, dcfg):
    from peft import get_peft_model

    with _quiet_warnings():
        return get_peft_model(model, lora_config(model, dcfg))


def save_adapter(peft_model, directory) -> None:
    """``save_pretrained`` without PEFT's warning about GGUF models having no config file."""
    with _quiet_warnings():
        peft_model.save_pretrained(str(directory))


@contextlib.contextmanager
def _quiet_warnings():
    """Hide PEFT/transformers warnings that are noise here (GGUF has no config file to diff)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Could not find a config file.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        yield


def lr_at(step: int, total: int, warmup: int, lr: float) -> float:
    """Linear warm-up, then linear decay towards zero."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    return lr * max(0.0, (total - step) / max(1, total - warmup))


# --------------------------------------------------------------------------------------------------
# the stage


RNG_FILE = "rng_state.safetensors"
TEACHER_DIR = "teacher_topk"
BEST_FILE = "best_adapter.safetensors"


def rng_tensors() -> dict:
    """The torch random number generators' states (CPU and every CUDA device) as uint8 tensors."""
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda{i}"] = st
    return out


def set_rng_tensors(states: dict) -> None:
    torch.set_rng_state(states["cpu"])
    cuda = [states[k] for k in sorted(k for k in states if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def lora_state(peft_model) -> dict:
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone().contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}


def _save_checkpoint(peft_model, opt, state: dict, ckpt: Path, best: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    tmp = ckpt.with_name(ckpt.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_adapter(peft_model, tmp)
    torch.save(opt.state_dict(), tmp / "optimizer.pt")  # tensors and numbers only: read with weights_only
    save_file(rng_tensors(), str(tmp / RNG_FILE))
    if best is not None:
        save_file(best, str(tmp / BEST_FILE))
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    old = ckpt.with_name(ckpt.name + ".old")
    if ckpt.exists():
        if old.exists():
            shutil.rmtree(old)
        ckpt.rename(old)
    tmp.rename(ckpt)
    if old.exists():
        shutil.rmtree(old)


def _load_checkpoint(peft_model, opt, ckpt: Path) -> tuple[dict, Optional[dict]]:
    """Restore adapter, optimizer and RNG states; returns (trainer state, best adapter weights or None).

    The optimizer state is read with ``weights_only=True``: a checkpoint that holds anything but
    tensors and plain containers is refused with a clear error instead of running its code."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from ..errors import PrismError

    try:
        opt_state = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError for foreign objects, and any corruption
        raise PrismError(
            f"{ckpt / 'optimizer.pt'} is not a plain optimizer state ({type(exc).__name__}); "
            f"delete {ckpt} to restart distillation"
        ) from None
    tensors = lambda path: load_file(str(path))  # noqa: E731
    adapter = _checkpoint_part(ckpt, "adapter_model.safetensors", tensors)
    rng = _checkpoint_part(ckpt, RNG_FILE, tensors) if (ckpt / RNG_FILE).is_file() else None
    best = _checkpoint_part(ckpt, BEST_FILE, tensors) if (ckpt / BEST_FILE).is_file() else None
    state = _checkpoint_part(ckpt, "trainer_state.json", _trainer_state)
    _checkpoint_part(ckpt, "adapter_model.safetensors", lambda _: set_peft_model_state_dict(peft_model, adapter))
    _checkpoint_part(ckpt, "optimizer.pt", lambda _: opt.load_state_dict(opt_state))
    if rng is not None:
        _checkpoint_part(ckpt, RNG_FILE, lambda _: set_rng_tensors(rng))
    return state, best


def _trainer_state(path: Path) -> dict:
    state = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(state, dict) or not isinstance(state.get("step", 0), int):
        raise ValueError("not an object with the step reached")
    return state


def _checkpoint_part(ckpt: Path, name: str, read: Callable):
    """``read(ckpt / name)``; a damaged part of the checkpoint is one line, never a traceback."""
    from ..errors import PrismError

    try:
        return read(ckpt / name)
    except Exception as exc:
        raise PrismError(
            f"the distillation checkpoint {ckpt} is damaged ({name}: {type(exc).__name__}); "
            "pass --redo distill to train from scratch"
        ) from None


def _read_curve(path: Path, max_step: Optional[int] = None) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if max_step is None or rec.get("step", 0) <= max_step:
            rows.append(rec)
    return rows


def plot_curve(curve: Sequence[dict], png: Path, title: str = "distillation loss") -> Optional[Path]:
    """Loss per optimisation step to a PNG (matplotlib, Agg backend); ``None`` if matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; no loss plot")
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if curve:
        ax.plot([r["step"] for r in curve], [r["loss"] for r in curve], marker="o", ms=3)
    ax.set_xlabel("optimisation step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


def planned_epochs(per_epoch: int, dcfg) -> int:
    """``epochs``, raised until the run has at least ``min_steps`` optimisation steps (never above
    ``max_epochs``): with few winning answers a fixed epoch count is a handful of steps that barely
    moves the LoRA."""
    epochs = max(1, int(dcfg.epochs))
    min_steps = int(dcfg.min_steps)
    if per_epoch and min_steps:
        epochs = max(epochs, min(int(dcfg.max_epochs), math.ceil(min_steps / per_epoch)))
    return epochs


def split_examples(examples: Sequence[Example], val_fraction: float, seed: int) -> tuple[list, list]:
    """(training, held-out) examples: ``int(n * val_fraction)`` random examples held out for early
    stopping (none when that is 0, or when fewer than 2 would be left to train on)."""
    k = int(len(examples) * max(0.0, val_fraction))
    if k < 1 or len(examples) - k < 2:
        if val_fraction > 0 and examples:
            log.warning(
                "distill: %d examples are too few to hold out %.0f%% for early stopping; training on all",
                len(examples),
                100 * val_fraction,
            )
        return list(examples), []
    order = list(range(len(examples)))
    random.Random(seed + 7919).shuffle(order)
    held = set(order[:k])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def stopped_early(state: dict, patience: int) -> bool:
    """True once the held-out KL has not improved for ``patience`` epochs."""
    if patience <= 0 or not state.get("best_epoch"):
        return False
    return state["epoch"] - state["best_epoch"] >= patience


def check_finite(loss: float, params, step: int, dcfg) -> None:
    """One line, naming the settings, at the first step whose loss or LoRA weights are NaN or infinite
    (before any checkpoint or adapter is written: a diverged LoRA is never saved)."""
    bad = {"loss": f"loss ({loss})", "weights": "LoRA weights", "": ""}[non_finite(loss, params)]
    if bad:
        from ..errors import PrismError

        raise PrismError(
            f"distillation diverged at step {step}: the {bad} became non-finite with distill.lr={dcfg.lr} and "
            f"distill.kl_temperature={dcfg.kl_temperature}; lower distill.lr or raise distill.kl_temperature "
            "(nothing was saved)"
        )


EXECUTION_ONLY = ("micro_tokens",)
"""Distillation settings that change how a step is computed, not what it computes (micro-batches add
up to the batch's gradient): not part of the stage's settings, so a run made before they existed
resumes, and a resumed run may change them (only the LoRA dropout's random draws then differ)."""


def distill_settings(cfg: RunConfig) -> dict:
    """The settings a distillation run depends on (a rerun with others is refused)."""
    from ..bootstrap.personas import shown

    use_length, placement = shown(cfg)
    return {
        "distill": {k: v for k, v in asdict(cfg.distill).items() if k not in EXECUTION_ONLY},
        "model": cfg.model.model,
        "seed": cfg.seed,
        "persona_length": use_length,
        "placement": placement,
    }


def prepare(ctx) -> None:
    """Before any stage writes: the LoRA's target modules exist in the loaded model (one line if not)."""
    lora_targets(ctx.model, ctx.options)


def step(ctx) -> None:
    """The stage registry's entry point: :func:`run_distill` on the run's labelled pairs, once per persona
    when the gate has a class per persona (:func:`prism_persona.train.personas.distill_personas`)."""
    from .personas import distill_personas

    distill_personas(ctx.run, ctx.cfg, ctx.records, ctx.model, ctx.tokenizer)


def run_distill(
    run, cfg: RunConfig, records: Sequence[dict], model=None, tokenizer=None, max_steps: Optional[int] = None
) -> dict:
    """Train (or resume, or skip when done) the LoRA; writes ``RUN/distill/adapter``, the loss curve
    (``loss.jsonl`` + ``loss.png``) and ``distill.done.json``. Returns the stage summary."""
    from ..models import load_model
    from .parallel import DataParallel

    dp = DataParallel()
    if run.done(STAGE):
        log.info("distill: already done, skipping (pass --redo distill to train it again)")
        return run.read_json(f"{STAGE}.done.json")
    run.check_settings(STAGE, distill_settings(cfg))
    t0 = time.perf_counter()
    d = run.path(STAGE)
    d.mkdir(parents=True, exist_ok=True)
    if model is None:
        model, tokenizer = load_model(
            cfg.model.model, cfg.model.dtype, dp.device(cfg.model.device), cfg.model.trust_remote_code
        )
    dcfg = cfg.distill
    torch.manual_seed(cfg.seed)
    records = per_sample(records)
    records, dropped_loops = without_loops(records) if dcfg.drop_loops else (list(records), 0)
    examples = build_examples(tokenizer, records, dcfg.max_length)
    examples, val_examples = split_examples(examples, float(dcfg.val_fraction), cfg.seed)
    n_retain = 0
    if float(dcfg.retain_weight) > 0 and examples:
        retain = build_retain_examples(tokenizer, records, dcfg.max_length, len(examples), cfg.seed)
        examples, n_retain = examples + retain, len(retain)
    peft_model = attach_lora(model, dcfg)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=dcfg.lr, weight_decay=0.0)
    bs, accum = max(1, int(dcfg.batch_size)), max(1, int(dcfg.grad_accum))
    group_size = accum * dp.world  # micro-batches per optimisation step, over all processes
    per_epoch = math.ceil(math.ceil(len(examples) / bs) / group_size) if examples else 0
    epochs = planned_epochs(per_epoch, dcfg)
    total = per_epoch * epochs
    if max_steps is not None:
        total = min(total, max_steps)
    warmup = int(dcfg.warmup_ratio * total)
    ckpt, curve_path = d / "checkpoint", d / "loss.jsonl"
    state = {"epoch": 0, "step": 0, "best_kl": None, "best_epoch": 0, "heldout_kl": []}
    best: Optional[dict] = None
    if ckpt.is_dir() and (ckpt / "trainer_state.json").exists():
        loaded, best = _load_checkpoint(peft_model, opt, ckpt)
        state.update(loaded)
        log.info("distill: resuming after epoch %d (step %d)", state["epoch"], state["step"])
    curve = _read_curve(curve_path, state["step"])
    if dp.is_main:
        curve_path.write_text("".join(json.dumps(r) + "\n" for r in curve), encoding="utf-8")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(peft_model.parameters()).device
    if not examples:
        log.warning(
            "distill: no query where the persona won (label 1); saving an untrained adapter "
            "(routed queries then behave exactly like the base model)"
        )
    cache = None
    needed = teacher_examples(dcfg, examples) + val_examples  # the held-out signal is a KL
    if needed:
        cache = TeacherCache(d / TEACHER_DIR, dcfg.top_k)
        cache.fill(peft_model, needed[dp.rank :: dp.world], pad_id, int(dcfg.micro_tokens))
        dp.barrier()
    if state["epoch"] == 0 and val_examples and not state["heldout_kl"]:
        kl0 = heldout_kl(peft_model, val_examples, dcfg, pad_id, cache)
        state["heldout_kl"] = [{"epoch": 0, "kl": kl0}]
        log.info("distill: held-out KL before training %.4f (%d examples)", kl0, len(val_examples))
    patience = int(dcfg.patience)
    peft_model.train()
    step = state["step"]
    for epoch in range(state["epoch"], epochs):
        if step >= total or stopped_early(state, patience):
            break
        order = list(range(len(examples)))
        random.Random(cfg.seed * 1000 + epoch).shuffle(order)
        batches = [order[i : i + bs] for i in range(0, len(order), bs)]
        for g in range(0, len(batches), group_size):
            if step >= total:
                break
            lr = lr_at(step, total, warmup, dcfg.lr)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad()
            loss_sum, n_tok = 0.0, 0
            step_batches = batches[g : g + group_size]
            for b in dp.shard(step_batches):  # all of them in a single process
                batch = [examples[i] for i in b]
                counts = token_counts(batch)
                for micro in micro_batches(batch, int(dcfg.micro_tokens)):
                    loss = distill_loss(peft_model, micro, dcfg, pad_id, cache, counts)
                    (loss / len(step_batches)).backward()
                    loss_sum += float(loss.detach()) / len(step_batches)
                n_tok += sum(e.n for e in batch)
            dp.sum_gradients(params)
            loss_sum, n_tok = dp.sum_scalar(loss_sum, device), int(dp.sum_scalar(n_tok, device))
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            check_finite(loss_sum, params, step, dcfg)
            rec = {"step": step, "epoch": epoch + 1, "loss": loss_sum, "lr": lr, "tokens": n_tok}
            curve.append(rec)
            if dp.is_main:
                with open(curve_path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(rec) + "\n")
            log.info("distill: epoch %d step %d/%d loss %.4f", epoch + 1, step, total, loss_sum)
        state.update(epoch=epoch + 1, step=step)
        if val_examples:
            kl = heldout_kl(peft_model, val_examples, dcfg, pad_id, cache)
            state["heldout_kl"] = list(state["heldout_kl"]) + [{"epoch": epoch + 1, "kl": kl}]
            log.info("distill: epoch %d held-out KL %.4f", epoch + 1, kl)
            if state["best_kl"] is None or kl < state["best_kl"]:
                state.update(best_kl=kl, best_epoch=epoch + 1)
                best = lora_state(peft_model)
        if dp.is_main:
            _save_checkpoint(peft_model, opt, dict(state), ckpt, best)
        dp.barrier()
    if best is not None and val_examples:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(peft_model, best)  # the epoch with the lowest held-out KL
    adapter = d / "adapter"
    if not dp.is_main:  # rank 0 writes the results; the others are done
        dp.barrier()
        peft_model.unload().eval()
        return {"examples": len(examples) - n_retain, "steps": step, "rank": dp.rank}
    if adapter.exists():
        shutil.rmtree(adapter)
    save_adapter(peft_model, adapter)
    png = plot_curve(curve, d / "loss.png", f"distillation ({dcfg.loss})")
    info = {
        "examples": len(examples) - n_retain,
        "heldout_examples": len(val_examples),
        "dropped_loops": dropped_loops,
        "retain_examples": n_retain,
        "steps": step,
        "epochs": epochs,
        "epochs_run": state["epoch"],
        "loss": dcfg.loss,
        "lr": dcfg.lr,
        "heldout_kl": state["heldout_kl"],
        "best_epoch": state["best_epoch"] if val_examples else state["epoch"],
        "first_loss": curve[0]["loss"] if curve else None,
        "last_loss": curve[-1]["loss"] if curve else None,
        "adapter": str(adapter),
        "loss_curve": str(curve_path),
        "loss_plot": str(png) if png else None,
        "teacher_cache": cache.computed if cache is not None else None,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if dp.active:
        info["processes"] = dp.world
    run.mark_done(STAGE, info)
    dp.barrier()
    peft_model.unload().eval()  # give the caller its plain base model back (LoRA layers removed)
    return info
