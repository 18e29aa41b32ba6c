"""A PRISM artifact run on a vLLM server: the gate decides here, vLLM generates.

:class:`RoutedEngine` is the :class:`~prism_persona.gated.model.GatedEngine` interface (``generate``,
``score_choices``, ``route``; every completion carries ``meta = {"routed", "gate_prob"}``) with the
work split the way ``prism serve --engine vllm`` splits it: the gate is computed in this process from
decoder layer 0 only (``gated.router.load_router``, the same features and threshold as the in-process
``GatedModel``: the chat's first user turn), and each row goes to the vLLM server either as the base
model or as the served LoRA (``prism``, the artifact's exported adapter). Routed and unrouted rows of
one call are sent together, so vLLM batches them as one.

``force`` is the ``GatedEngine`` switch: ``True`` = the LoRA on every row (the ``lora`` system),
``False`` = the base on every row, ``None`` = the gate decides (the ``prism`` system), a persona's name =
that persona's adapter on every row. The gate probability is reported in every case.

A K-way artifact (one adapter per persona) has each adapter served under its persona's name (vLLM
``--lora-modules NAME=DIR`` for each, ``--max-loras K``): a routed row goes to the model named by the
persona its gate picked, and every completion's meta names it (``persona``, ``persona_prob``), as the
in-process ``GatedModel`` reports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from ..engines.base import Completion, Engine, SamplingParams


class RoutedEngine(Engine):
    """Per-row routing between a server's base model and its LoRA ``lora_name``."""

    name = "prism-vllm"

    def __init__(self, engine, router, lora_name: str = "prism", force: Optional[bool | str] = None):
        self.engine = engine
        self.router = router
        self.lora_name = lora_name
        self.force = force
        self.model_name = engine.model_name

    def route(self, chats: Sequence[list]) -> list[tuple[float, bool]]:
        """``(gate_prob, routed)`` per chat, from its first user turn (the in-process gate's decision)."""
        return [(float(p), bool(r)) for p, r in self.router.route(list(chats))]

    @property
    def persona_names(self) -> list:
        """The router's persona names (``[None]`` for a router that names none)."""
        return list(getattr(self.router, "persona_names", None) or [None])

    def _plan(self, chats: Sequence[list]) -> tuple[list, list]:
        """(served model per row, meta per row): ``routed`` and ``gate_prob``; ``persona`` and
        ``persona_prob`` when the router names its personas; ``abstained`` and ``outside`` when the
        router's gate can abstain (as the in-process ``GatedModel`` reports them, from the same decision)."""
        from .model import persona_of_force

        names = self.persona_names
        named = hasattr(self.router, "persona_names") and hasattr(self.router, "decisions")
        if named or getattr(self.router, "has_abstain", False):
            decided = self.router.decisions(list(chats))
        else:
            decided = [{"gate_prob": float(p), "routed": bool(r)} for p, r in self.route(chats)]
        forced = persona_of_force(names, self.force) if isinstance(self.force, str) else None
        models, metas = [], []
        for d in decided:
            routed = d["routed"] if self.force is None else self.force is not False
            meta = {"routed": routed, "gate_prob": float(d["gate_prob"])}
            k = None
            if named:
                probs = list(d.get("persona_probs") or [])
                if routed and forced is not None:
                    k = forced
                elif routed and probs:  # the gate's persona (forced on: its most probable one)
                    k = max(range(len(probs)), key=probs.__getitem__)
                meta["persona"] = names[k] if k is not None and k < len(names) else None
                meta["persona_prob"] = probs[k] if k is not None and k < len(probs) else None
            if getattr(self.router, "has_abstain", False):
                for key in ("abstained", "outside"):
                    if key in d:
                        meta[key] = bool(d[key])
            # one adapter per persona: each served under its persona's name
            models.append((names[k] if len(names) > 1 and k is not None else self.lora_name) if routed else None)
            metas.append(meta)
        return models, metas

    def generate(self, chats: Sequence[list], params: SamplingParams, desc: str = "generate") -> list[Completion]:
        chats = list(chats)
        if not chats:
            return []
        models, metas = self._plan(chats)
        out = self.engine.generate(chats, params, desc=desc, model=models)
        for completion, meta in zip(out, metas):
            completion.meta = {**(completion.meta or {}), **meta}
        return out

    def score_choices(self, chats: Sequence[list], choices: Sequence[str]) -> list[dict]:
        """log P(first token of each choice), each row on the model its routing picks."""
        return self.score_choices_meta(chats, choices)[0]

    def score_choices_meta(self, chats: Sequence[list], choices: Sequence[str]) -> tuple[list[dict], list[dict]]:
        """(:meth:`score_choices`, the routing meta of each row as :meth:`generate` reports it), from one
        decision per row."""
        chats = list(chats)
        if not chats:
            return [], []
        models, metas = self._plan(chats)
        return self.engine.score_choices(chats, choices, model=models), metas

    @property
    def can_score(self) -> bool:
        return True

    @property
    def preferred_call_size(self) -> int:
        return getattr(self.engine, "preferred_call_size", 0)

    @property
    def tokens_generated(self) -> int:
        return getattr(self.engine, "tokens_generated", 0)

    def close(self) -> None:
        """The shared server engine is closed by its owner."""
