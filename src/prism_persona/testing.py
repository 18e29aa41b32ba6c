"""Test doubles that ship with the library: a scripted engine and tiny random causal LMs.

Users can test their own judges and pipelines with them too; nothing here touches the network.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Callable, Optional, Sequence

from .engines.base import Completion, Engine, SamplingParams

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

NO_SYSTEM_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ScriptedEngine(Engine):
    """An engine that returns queued outputs (or a function's), and records every call.

    >>> eng = ScriptedEngine(["first", "second"])
    >>> [c.text for c in eng.generate([[{"role": "user", "content": "q"}]] * 2, SamplingParams())]
    ['first', 'second']

    ``responder(chat) -> str`` answers when the queue is empty. ``scorer(chat, choices) -> dict``
    enables :meth:`score_choices` (log-prob verdicts); without it the engine cannot score.
    """

    name = "scripted"

    def __init__(self, outputs: Sequence[str] = (), responder: Optional[Callable] = None,
                 scorer: Optional[Callable] = None, model_name: str = "scripted"):
        self.queue = collections.deque(outputs)
        self.responder = responder
        self.scorer = scorer
        self.model_name = model_name
        self.calls: list[tuple[list, SamplingParams]] = []
        self.score_calls: list[tuple[list, tuple]] = []
        self.tokens_generated = 0

    def enqueue(self, *outputs: str) -> "ScriptedEngine":
        self.queue.extend(outputs)
        return self

    def generate(self, chats, params: SamplingParams, desc: str = "") -> list[Completion]:
        out = []
        for chat in chats:
            self.calls.append((chat, params))
            if self.queue:
                text = self.queue.popleft()
            elif self.responder is not None:
                text = self.responder(chat)
            else:
                raise AssertionError("ScriptedEngine: no output queued for this call")
            n = len(text.split())
            self.tokens_generated += n
            out.append(Completion(text=text, num_tokens=n))
        return out

    def score_choices(self, chats, choices):
        if self.scorer is None:
            return None
        res = []
        for chat in chats:
            self.score_calls.append((chat, tuple(choices)))
            res.append(dict(self.scorer(chat, list(choices))))
        return res

    @property
    def can_score(self) -> bool:
        return self.scorer is not None


def make_tokenizer(system_role: bool = True):
    """A byte-level tokenizer (256 byte tokens + ChatML specials) built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHATML_TEMPLATE if system_role else NO_SYSTEM_TEMPLATE
    tok.padding_side = "left"
    return tok


def make_tiny_model(path: str | Path, num_layers: int = 3, hidden_size: int = 64, seed: int = 0,
                    system_role: bool = True, arch: str = "llama") -> Path:
    """Save a tiny randomly initialised causal LM + tokenizer to ``path`` and return it.

    ``arch`` is ``llama`` or ``qwen2`` (the two families PRISM is most used with).
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    path = Path(path)
    tok = make_tokenizer(system_role)
    common = dict(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=None, tie_word_embeddings=False,
    )
    cfg = Qwen2Config(**common) if arch == "qwen2" else LlamaConfig(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    # Larger-than-default init so the random model's next-token distribution is far from uniform
    # and depends on the prompt (a persona then changes it, as in a real model).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
