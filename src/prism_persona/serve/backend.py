"""What the server needs from a gated model, adapted from the ``GatedModel`` interface.

:class:`GatedBackend` wraps any object with ``generate(chats, params, force)`` (and, when present,
``tokenizer``, ``forward_logits`` and ``route``) — the real :class:`~prism_persona.gated.model.GatedModel`
or a test double — and adds prompt-token counting and first-token log-probabilities. All its methods
are called from the single model worker thread only, so the tokenizer is never used concurrently.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional


def _tokenizer_of(model):
    for name in ("tokenizer", "tok"):
        tok = getattr(model, name, None)
        if tok is not None:
            return tok
    return None


class GatedBackend:
    """Server-side view of a gated model: generate, route, count tokens, score the first token."""

    def __init__(self, model, name: str = "prism"):
        self.model = model
        self.name = name
        self.tokenizer = _tokenizer_of(model)
        self._max_token_chars: Optional[int] = None

    # -- prompts ----------------------------------------------------------------------------------

    def render(self, chat: Sequence[dict]) -> str:
        from ..models import render_chat

        return render_chat(self.tokenizer, chat)

    def surely_over(self, chat: Sequence[dict], limit: int) -> bool:
        """Whether ``chat`` has more than ``limit`` tokens by its length alone: more characters than
        ``limit`` of the tokenizer's longest tokens hold. Such a prompt is refused without tokenizing
        it (a megabyte prompt took seconds and memory the allocator never returned)."""
        if self.tokenizer is None:
            return False
        chars = sum(len(m.get("content") or "") for m in chat)
        return chars > limit * self.max_token_chars

    @property
    def max_token_chars(self) -> int:
        if self._max_token_chars is None:
            vocab = self.tokenizer.get_vocab() if hasattr(self.tokenizer, "get_vocab") else {}
            self._max_token_chars = max((len(t) for t in vocab), default=64) or 64
        return self._max_token_chars

    def count_tokens(self, chat: Sequence[dict]) -> Optional[int]:
        """Prompt length in tokens after the chat template; ``None`` if the model has no tokenizer."""
        if self.tokenizer is None:
            return None
        return len(self.tokenizer(self.render(chat), add_special_tokens=False)["input_ids"])

    # -- model calls ------------------------------------------------------------------------------

    def generate(self, chats: list, params, force: list) -> list:
        return self.model.generate(chats, params, force=force)

    def route(self, chats: list) -> list:
        """``[(gate_prob, routed)]`` per chat."""
        return [(float(p), bool(r)) for p, r in self.model.route(chats)]

    def decisions(self, chats: list) -> list[dict]:
        """``{"gate_prob", "routed"}`` per chat, with ``"persona"`` / ``"persona_prob"`` when the model
        reports them and ``"abstained"`` / ``"outside"`` when its gate can abstain (one decision: the
        model's :meth:`decisions`)."""
        if hasattr(self.model, "decisions") and hasattr(self.model, "persona_names"):
            out = []
            for d in self.model.decisions(chats):
                row = {"gate_prob": float(d["gate_prob"]), "routed": bool(d["routed"])}
                row.update(
                    persona=d.get("persona_name"),
                    persona_prob=d.get("persona_prob"),
                    persona_probs=d.get("persona_probs"),
                )
                if getattr(self.model, "has_abstain", False):
                    row.update(abstain_fields(d))
                out.append(row)
            return out
        if getattr(self.model, "has_abstain", False) and hasattr(self.model, "decisions"):
            return [
                {"gate_prob": float(d["gate_prob"]), "routed": bool(d["routed"]), **abstain_fields(d)}
                for d in self.model.decisions(chats)
            ]
        return [{"gate_prob": p, "routed": r} for p, r in self.route(chats)]

    @property
    def persona_names(self) -> list:
        """The model's persona names (``None``: an artifact's unnamed adapter); ``[None]`` for a model that
        names none."""
        return list(getattr(self.model, "persona_names", None) or [None])

    @property
    def kway(self) -> bool:
        """The model routes among several named personas (a K-way gate)."""
        return len(self.persona_names) > 1

    def check_force(self, force) -> None:
        """A forced persona name the model does not have: a one-line ``ValueError`` naming the ones it has."""
        if isinstance(force, str):
            from ..gated.model import persona_of_force

            persona_of_force(self.persona_names, force)

    def forced(self, decision: dict, force) -> dict:
        """``decision`` (from :meth:`decisions`) as a request with ``force`` gets it: False = the base model,
        True = routed to the gate's most probable persona, a name = routed to that persona; the persona's
        probability stays the gate's."""
        if force is None:
            return decision
        out = dict(decision)
        if force is False:
            out.update(routed=False)
            if "persona" in out:
                out.update(persona=None, persona_prob=None)
            return out
        out["routed"] = True
        probs = list(decision.get("persona_probs") or [])
        if "persona" not in decision or not probs:
            return out
        from ..gated.model import persona_of_force

        names = self.persona_names
        k = persona_of_force(names, force) if isinstance(force, str) else max(range(len(probs)), key=probs.__getitem__)
        out.update(persona=names[k], persona_prob=probs[k] if k < len(probs) else None)
        return out

    @property
    def can_logprob(self) -> bool:
        return self.tokenizer is not None and hasattr(self.model, "forward_logits")

    def first_token_logprobs(self, chats: list, force: list, texts: list, top_n: int) -> list:
        """Per chat: ``(first, top)`` where ``first`` is (token, logprob) of the first token of the
        generated text and ``top`` the ``top_n`` most likely first tokens. ``force`` should be the
        routing each generation actually used, so the scores come from the same LoRA on/off state."""
        import torch

        from ..models import encode_prompts

        device = getattr(self.model, "device", None)
        enc = encode_prompts(self.tokenizer, [self.render(c) for c in chats], device)
        with torch.inference_mode():
            out = self.model.forward_logits(enc["input_ids"], enc["attention_mask"], force=force)
        logits = out[0] if isinstance(out, (tuple, list)) else out
        logp = torch.log_softmax(logits[:, -1, :].float(), dim=-1)
        k = max(1, min(int(top_n), logp.shape[-1]))
        top_lp, top_ids = torch.topk(logp, k, dim=-1)
        results = []
        for row, text in enumerate(texts):
            first_id = self._first_token_id(text)
            first = (self._token_text(first_id), float(logp[row, first_id])) if first_id is not None else None
            top = [(self._token_text(int(i)), float(lp)) for i, lp in zip(top_ids[row].tolist(), top_lp[row].tolist())]
            results.append((first, top[:top_n] if top_n > 0 else []))
        return results

    def _first_token_id(self, text: str) -> Optional[int]:
        if text:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if ids:
                return int(ids[0])
        eos = self.tokenizer.eos_token_id
        return int(eos) if isinstance(eos, int) else None

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def abstain_fields(decision: dict) -> dict:
    """``abstained`` (and ``outside`` where the decision holds it) of one decision of a gate that can abstain."""
    out = {"abstained": bool(decision["abstained"])}
    if "outside" in decision:
        out["outside"] = bool(decision["outside"])
    return out


def load_backend(
    artifact: str,
    device: str = "auto",
    dtype: str = "auto",
    route_only: bool = False,
    name: str = "prism",
    trust_remote_code: bool = False,
):
    """A :class:`GatedBackend` for the artifact directory ``artifact`` (``RUN/prism``); with
    ``route_only`` only embeddings + decoder layer 0 + the gate are loaded. ``trust_remote_code`` only
    from the user's ``--trust-remote-code`` (never from the artifact)."""
    if route_only:
        from ..gated.router import load_router

        return GatedBackend(load_router(artifact, device, dtype, trust_remote_code), name=name)
    from ..gated.model import GatedModel

    return GatedBackend(
        GatedModel.from_pretrained(artifact, device=device, dtype=dtype, trust_remote_code=trust_remote_code), name=name
    )
