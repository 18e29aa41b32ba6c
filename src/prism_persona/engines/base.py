"""The engine interface: generate a batch of chats; optionally score candidate first tokens."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    seed: Optional[int] = None
    """Seeds the sampler for this call; the same seed, chats and batch give the same text."""
    stop: tuple = ()
    """Extra stop strings; the text is cut before the first one (EOS always stops)."""


@dataclass
class Completion:
    text: str
    num_tokens: int = 0
    finish_reason: str = "stop"  # "stop" (EOS or stop string) or "length"
    meta: dict = field(default_factory=dict)


class Engine(abc.ABC):
    """Subclass and implement :meth:`generate`. Chats are lists of ``{"role", "content"}`` dicts."""

    name: str = "engine"
    model_name: str = ""
    supports_prefill: bool = False
    """True when a chat ending with an assistant message is continued (the reply starts inside it)."""
    preferred_call_size: int = 0
    """Chats a caller should send per :meth:`generate` call when it has many (0 = no preference: the
    caller's batch size). Server engines ask for their requests in flight, so a server's continuous
    batching stays fed instead of draining at the end of every small call."""

    @abc.abstractmethod
    def generate(self, chats: Sequence[list], params: SamplingParams) -> list[Completion]:
        """One completion per chat, in order."""

    def score_choices(self, chats: Sequence[list], choices: Sequence[str]) -> Optional[list[dict]]:
        """For each chat, log P(choice | chat + generation prompt) of each choice's first token.

        Returns ``None`` when the engine cannot score (the caller then parses generated text).
        """
        return None

    @property
    def can_score(self) -> bool:
        return type(self).score_choices is not Engine.score_choices

    def close(self) -> None:
        """Release resources (HTTP sessions, GPU memory); nothing to release by default."""
        return None


def choice_token_ids(tokenizer, choice: str) -> list[int]:
    """Token ids that start ``choice``, spelled with and without a leading space (log-prob verdicts
    pool both spellings, so every engine must pick the same ids)."""
    ids = set()
    for variant in (choice, " " + choice):
        toks = tokenizer(variant, add_special_tokens=False)["input_ids"]
        if toks:
            ids.add(toks[0])
    return sorted(ids)
