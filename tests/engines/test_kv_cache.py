"""The in-process engine's preallocated KV cache: generate's tokens, without copying the cache per step."""

from __future__ import annotations

import pytest
import torch

from prism_persona.engines.kv_cache import cache_kwargs, preallocated_cache
from prism_persona.models import encode_prompts, render_chat

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUESTIONS = ("hi", "a much longer question about many things here", "mid length one", "x")


def encoded(tok):
    return encode_prompts(tok, [render_chat(tok, [{"role": "user", "content": q}]) for q in QUESTIONS], "cpu")


def generate_kwargs(tok, temperature: float, eos: int) -> dict:
    kw = dict(max_new_tokens=24, pad_token_id=tok.pad_token_id, eos_token_id=[eos])
    if temperature:
        return dict(kw, do_sample=True, temperature=temperature, top_p=0.9, top_k=0)
    return dict(kw, do_sample=False, temperature=None, top_p=None, top_k=None)


def stopping_token(model, enc) -> int:
    """A token the greedy rows produce part-way, used as EOS so that rows stop at different steps."""
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False, pad_token_id=0)
    new = out[:, enc["input_ids"].shape[1] :]
    return int(new[:, 4:12].flatten().mode().values)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_generate_with_the_preallocated_cache_gives_the_same_tokens(tiny_model, temperature):
    model, tok = tiny_model
    enc = encoded(tok)
    kw = generate_kwargs(tok, temperature, stopping_token(model, enc))
    with torch.inference_mode():
        torch.manual_seed(7)
        ref = model.generate(**enc, **kw)
        cache = preallocated_cache(model, enc["input_ids"].shape[1] + 24)
        assert cache is not None
        torch.manual_seed(7)
        out = model.generate(**enc, **kw, **cache_kwargs(model, cache))
    assert torch.equal(ref, out)
    new = out[:, enc["input_ids"].shape[1] :]
    assert bool((new == kw["eos_token_id"][0]).any())  # EOS really stopped rows part-way
    layer = cache.layers[0]
    assert layer._keys.shape[2] == enc["input_ids"].shape[1] + 24  # one buffer, sized once
    assert layer.length == out.shape[1] - 1 == layer.keys.shape[2]  # filled in place up to the last fed token
    assert layer.keys.data_ptr() == layer._keys.data_ptr()  # attention reads a view of the buffer


def test_a_full_cache_raises_instead_of_growing(tiny_model):
    model, tok = tiny_model
    enc = encoded(tok)
    cache = preallocated_cache(model, enc["input_ids"].shape[1] + 2)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="cache full"):
        model.generate(**enc, **generate_kwargs(tok, 0.0, -1), **cache_kwargs(model, cache))


def test_sliding_window_models_keep_generates_own_cache():
    from transformers import AutoModelForCausalLM, MistralConfig

    cfg = MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
    )
    assert preallocated_cache(AutoModelForCausalLM.from_config(cfg), 16) is None


def test_hf_engine_output_is_the_same_with_and_without_the_cache(tiny_model, monkeypatch):
    from prism_persona.engines import SamplingParams, kv_cache
    from prism_persona.engines.hf import HFEngine

    model, tok = tiny_model
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    # greedy over two batches (streamed through one cache), and unseeded sampling in one batch (the
    # global generator's draws; seeded sampling draws per row with the cache, per batch without it)
    for params, batch in (
        (SamplingParams(max_new_tokens=12), 4),
        (SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9), len(chats)),
    ):
        used: list = []

        def spy(m, capacity, used=used):
            cache = preallocated_cache(m, capacity)
            used.append(cache)
            return cache

        monkeypatch.setattr(kv_cache, "preallocated_cache", spy)
        torch.manual_seed(5)
        fast = [c.text for c in HFEngine(model, tok, batch_size=batch, quiet=True).generate(chats, params)]
        assert used and all(c is not None and c.layers[0].length > 0 for c in used)
        monkeypatch.setattr(kv_cache, "preallocated_cache", lambda m, capacity: None)
        torch.manual_seed(5)
        plain = [c.text for c in HFEngine(model, tok, batch_size=batch, quiet=True).generate(chats, params)]
        assert fast == plain


def test_score_choices_in_sorted_batches_equal_one_row_full_logits(tiny_model):
    from prism_persona.engines.hf import HFEngine

    model, tok = tiny_model
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    batched = HFEngine(model, tok, batch_size=3, quiet=True).score_choices(chats, ["A", "B"])
    eng = HFEngine(model, tok, batch_size=1, quiet=True)
    for chat, got in zip(chats, batched):
        enc = encode_prompts(tok, [render_chat(tok, chat)], "cpu")
        with torch.inference_mode():
            logp = torch.log_softmax(model(**enc).logits[0, -1].float(), dim=-1)
        for choice in ("A", "B"):
            ref = float(torch.logsumexp(logp[eng.choice_token_ids(choice)], dim=0))
            assert got[choice] == pytest.approx(ref, abs=1e-4)


def test_a_cache_is_one_block_and_a_regrown_cache_moves_every_layer_to_a_new_one(tiny_model):
    """All layers' keys and values live in one allocation (freed as one mapping when the call ends);
    regrowing moves every layer into one new block, with the filled positions shifted and kept."""
    from prism_persona.engines import kv_cache

    model, tok = tiny_model
    enc = encoded(tok)
    cache = preallocated_cache(model, enc["input_ids"].shape[1] + 4)
    with torch.inference_mode():
        model(**enc, **cache_kwargs(model, cache), use_cache=True)

    def blocks():
        return {layer._keys.untyped_storage().data_ptr() for layer in cache.layers} | {
            layer._values.untyped_storage().data_ptr() for layer in cache.layers
        }

    before = blocks()
    assert len(before) == 1 and len(cache.layers) > 1
    filled = [layer.keys.clone() for layer in cache.layers]
    kv_cache.regrow(cache, cache.layers[0].capacity + 6, 2)
    after = blocks()
    assert len(after) == 1 and after != before
    for layer, old in zip(cache.layers, filled):
        assert torch.equal(layer.keys[:, :, 2:], old) and not layer.keys[:, :, :2].any()
