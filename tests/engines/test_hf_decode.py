"""The HF engine's own decode loop: generate's tokens, with rows stopped inside the loop and dropped."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from prism_persona import config as C
from prism_persona.engines import SamplingParams
from prism_persona.engines.hf import HFEngine, _compaction

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUESTIONS = (
    "hi",
    "a much longer question about many things here",
    "mid length one",
    "x",
    "what is the capital of a country far away",
    "tell me",
)


def chats():
    return [[{"role": "user", "content": q}] for q in QUESTIONS]


def run(model, tok, params, own_loop: bool, monkeypatch, batch_size=6, eos=None):
    eng = HFEngine(model, tok, batch_size=batch_size, quiet=True)
    if eos is not None:
        monkeypatch.setattr(eng, "_eos_ids", lambda: [eos])
    if not own_loop:
        monkeypatch.setattr(eng, "_own_loop_exact", lambda p: False)
    calls = []
    for name in ("_decode", "_stream"):
        real = getattr(eng, name)
        monkeypatch.setattr(eng, name, lambda *a, real=real: calls.append(1) or real(*a))
    torch.manual_seed(5)  # unseeded sampling draws from the global generator: the same draws for both paths
    out = eng.generate(chats(), params)
    assert bool(calls) == own_loop  # the path under test really ran
    return out, eng


def reference_tokens(model, tok, max_new):
    eng = HFEngine(model, tok, batch_size=6, quiet=True)
    from prism_persona.models import encode_prompts, render_chat

    enc = encode_prompts(tok, [render_chat(tok, c) for c in chats()], "cpu")
    with torch.inference_mode():
        gen = model.generate(**enc, **eng._sampling_kwargs(SamplingParams(max_new_tokens=max_new), []))
    return gen[:, enc["input_ids"].shape[1] :]


GREEDY = SamplingParams(max_new_tokens=20, temperature=0.0)


@pytest.mark.parametrize(
    "params, batch_size",
    [
        (GREEDY, 6),
        (GREEDY, 4),  # two batches: the rows stream through one cache
        # unseeded sampling in one batch: the fixed-batch loop draws generate's noise from the global generator
        (SamplingParams(max_new_tokens=20, temperature=0.9, top_p=0.9), 6),
        (SamplingParams(max_new_tokens=20, temperature=1.0, top_p=1.0), 6),
    ],
    ids=["greedy-6", "greedy-4", "top-p", "plain-sampling"],
)
def test_own_loop_equals_generate_with_rows_stopping_part_way(tiny_model, monkeypatch, params, batch_size):
    model, tok = tiny_model
    # an EOS the greedy rows produce part-way, so rows leave the batch at different steps
    ref = reference_tokens(model, tok, 20).tolist()
    rows_with = {t: sum(t in r for r in ref) for r in ref for t in r[3:10]}
    eos = max((t for t, n in rows_with.items() if n < len(ref)), key=lambda t: rows_with[t])
    old, _ = run(model, tok, params, False, monkeypatch, batch_size, eos)
    new, eng = run(model, tok, params, True, monkeypatch, batch_size, eos)
    assert [c.text for c in new] == [c.text for c in old]
    assert [c.finish_reason for c in new] == [c.finish_reason for c in old]
    assert [c.num_tokens for c in new] == [c.num_tokens for c in old]
    if params.temperature == 0:
        finish = {c.finish_reason for c in new}
        assert finish == {"stop", "length"}  # some rows stopped early, some ran to the budget


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_stop_strings_stop_rows_inside_the_loop_with_the_same_text(tiny_model, monkeypatch, temperature):
    model, tok = tiny_model
    params = SamplingParams(max_new_tokens=24, temperature=temperature)
    full, _ = run(model, tok, params, False, monkeypatch)
    # a two-character string that appears part-way in some rows' text (byte-level tokens: often 2 tokens)
    texts = [c.text for c in full]
    candidates = [t[k : k + 2] for t in texts for k in range(3, max(3, len(t) - 4)) if t[k : k + 2].strip()]
    stop = max(set(candidates), key=lambda s: sum(s in t for t in texts))
    params = SamplingParams(max_new_tokens=24, temperature=temperature, stop=(stop,))
    old, old_eng = run(model, tok, params, False, monkeypatch)
    new, new_eng = run(model, tok, params, True, monkeypatch)
    assert [c.text for c in new] == [c.text for c in old]
    assert [c.finish_reason for c in new] == [c.finish_reason for c in old]
    cut = [i for i, c in enumerate(old) if stop in full[i].text]
    assert cut, "the stop string must cut some row"
    for i in cut:  # rows cut by the stop string stopped there instead of spending the whole budget
        assert new[i].num_tokens < old[i].num_tokens == 24
    assert new_eng.tokens_generated < old_eng.tokens_generated


def test_a_row_stops_at_the_first_token_whose_text_contains_the_stop(tiny_model, monkeypatch):
    model, tok = tiny_model
    params = SamplingParams(max_new_tokens=16, temperature=0.0)
    full, _ = run(model, tok, params, False, monkeypatch)
    text = full[1].text
    stop = text[len(text) // 2]
    got, eng = run(model, tok, SamplingParams(max_new_tokens=16, temperature=0.0, stop=(stop,)), True, monkeypatch)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    shortest = next(n for n in range(1, len(ids) + 1) if stop in tok.decode(ids[:n], skip_special_tokens=True))
    assert got[1].text == text[: text.index(stop)].strip()
    assert got[1].num_tokens <= shortest + 1  # byte-level re-tokenisation may merge one token differently


def test_compaction_fills_finished_slots_from_the_end():
    moves, keep = _compaction(6, [1, 4])
    assert moves == [(1, 5)] and keep == [0, 5, 2, 3]
    moves, keep = _compaction(5, [3, 4])
    assert moves == [] and keep == [0, 1, 2]
    moves, keep = _compaction(4, [0, 1, 2])
    assert moves == [(0, 3)] and keep == [3]


def test_models_with_extra_logits_processors_keep_generate(tiny_model, monkeypatch):
    model, tok = tiny_model
    eng = HFEngine(model, tok, quiet=True)
    assert eng._own_loop_exact(SamplingParams())
    monkeypatch.setattr(model.generation_config, "repetition_penalty", 1.3)
    assert not eng._own_loop_exact(SamplingParams())


@pytest.mark.parametrize("batch_size", [2, 3, 4])
def test_waiting_rows_join_the_batch_with_generates_greedy_tokens(tiny_model, monkeypatch, batch_size):
    """More chats than the batch: greedy rows stream through one cache (rows leave at EOS and waiting
    prompts join the live batch) and get the tokens generate gives them in its fixed batches."""
    model, tok = tiny_model
    ref = reference_tokens(model, tok, 20).tolist()
    rows_with = {t: sum(t in r for r in ref) for r in ref for t in r[3:10]}
    eos = max((t for t, n in rows_with.items() if n < len(ref)), key=lambda t: rows_with[t])
    params = SamplingParams(max_new_tokens=20, temperature=0.0)
    old, _ = run(model, tok, params, False, monkeypatch, batch_size, eos)
    eng = HFEngine(model, tok, batch_size=batch_size, quiet=True)
    monkeypatch.setattr(eng, "_eos_ids", lambda: [eos])
    from prism_persona.engines.kv_cache import PreallocatedLayer

    streamed, seen = [], []
    real = eng._stream
    monkeypatch.setattr(eng, "_stream", lambda *a: streamed.append(1) or real(*a))
    for name in ("add_rows", "regrow"):
        method = getattr(PreallocatedLayer, name)
        monkeypatch.setattr(PreallocatedLayer, name, lambda self, *a, m=method, n=name: seen.append(n) or m(self, *a))
    new = eng.generate(chats(), params)
    assert streamed and {"add_rows", "regrow"} <= set(seen)  # rows joined a live batch, the cache grew
    assert [c.text for c in new] == [c.text for c in old]
    assert [c.num_tokens for c in new] == [c.num_tokens for c in old]
    assert {c.finish_reason for c in new} == {"stop", "length"}


def test_streamed_rows_stop_at_stop_strings_and_unseeded_sampling_runs(tiny_model, monkeypatch):
    model, tok = tiny_model
    greedy = SamplingParams(max_new_tokens=24, temperature=0.0)
    full, _ = run(model, tok, greedy, False, monkeypatch, batch_size=2)
    stop = full[2].text[len(full[2].text) // 2]
    cut, _ = run(model, tok, SamplingParams(max_new_tokens=24, stop=(stop,)), False, monkeypatch, batch_size=2)
    eng = HFEngine(model, tok, batch_size=2, quiet=True)
    got = eng.generate(chats(), SamplingParams(max_new_tokens=24, stop=(stop,)))
    assert [c.text for c in got] == [c.text for c in cut]
    assert got[2].num_tokens < 24
    sampled = eng.generate(chats(), SamplingParams(max_new_tokens=8, temperature=0.9, top_p=0.9))
    assert len(sampled) == len(QUESTIONS) and all(0 < c.num_tokens <= 8 for c in sampled)


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.95])
def test_sorted_top_p_equals_the_transformers_warper(top_p):
    from transformers import TopPLogitsWarper

    from prism_persona.engines.hf import SortedTopP

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(16, 5000, generator=g) * 3
    scores[3] = scores[3].round()  # many equal values, ties at the nucleus boundary likely
    scores[4] = 0.0  # all tied
    scores[5, :10] = 40.0  # one row's nucleus is a handful of tokens
    warper = TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1)
    want = warper(None, scores.clone())
    got = SortedTopP(warper)(None, scores.clone())
    assert torch.equal(got, want)
    assert bool(torch.isinf(got).any()) and bool((~torch.isinf(got)).sum(-1).ge(1).all())


def _cache_allocations(monkeypatch) -> list[tuple[int, int]]:
    """(rows, capacity) of every preallocated cache layer allocated from now on."""
    from prism_persona.engines.kv_cache import PreallocatedLayer

    seen: list[tuple[int, int]] = []
    real = PreallocatedLayer.lazy_initialization

    def spy(self, k, v, *a, **kw):
        seen.append((k.shape[0], self.capacity))
        return real(self, k, v, *a, **kw)

    monkeypatch.setattr(PreallocatedLayer, "lazy_initialization", spy)
    return seen


def test_the_token_budget_bounds_each_batchs_cache_and_keeps_greedy_tokens(tiny_model, monkeypatch):
    """``batch_tokens`` caps rows x (longest prompt + new tokens) of a batch: the cache holds fewer
    rows (the rest stream in as rows finish), and greedy rows get the same tokens as without a budget."""
    model, tok = tiny_model
    params = SamplingParams(max_new_tokens=20, temperature=0.0)
    free = HFEngine(model, tok, batch_size=6, quiet=True, batch_tokens=0)
    ref = free.generate(chats(), params)
    longest = max(len(tok(free_text, add_special_tokens=False)["input_ids"]) for free_text in _texts(tok))
    budget = 2 * (longest + 20) + 5  # room for two rows of the longest prompt
    seen = _cache_allocations(monkeypatch)
    eng = HFEngine(model, tok, batch_size=6, quiet=True, batch_tokens=budget)
    assert eng.rows_for(longest, 20) == 2 and free.rows_for(longest, 20) == 6
    got = eng.generate(chats(), params)
    assert [c.text for c in got] == [c.text for c in ref]
    assert [c.num_tokens for c in got] == [c.num_tokens for c in ref]
    rows, capacity = seen[0]  # the stream's cache: sized by the budget, not by batch_size
    assert rows == 2 and rows * capacity <= budget
    assert HFEngine(model, tok, batch_size=6, batch_tokens=1).rows_for(longest, 20) == 1  # never zero rows
    # without an explicit budget an engine (the gated model's too) takes the setting's default
    assert HFEngine(model, tok, batch_size=6).batch_tokens == C.EngineConfig().hf_batch_tokens > 0


def _texts(tok):
    from prism_persona.models import render_chat

    return [render_chat(tok, c) for c in chats()]


def test_scores_are_the_same_under_a_token_budget(tiny_model):
    model, tok = tiny_model
    free = HFEngine(model, tok, batch_size=6, quiet=True, batch_tokens=0).score_choices(chats(), ["A", "B"])
    tight = HFEngine(model, tok, batch_size=6, quiet=True, batch_tokens=40).score_choices(chats(), ["A", "B"])
    assert len(tight) == len(free)
    for a, b in zip(free, tight):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)


def test_a_seeded_rows_sample_does_not_depend_on_the_rows_batched_with_it(tiny_model):
    """Seeded sampling streams, each row with its own generator: the same samples whatever the batch
    size or token budget (so stages can pack rows into one stream), a new seed gives new samples."""
    model, tok = tiny_model
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=7)
    outs = []
    for batch_size, budget in ((6, 0), (2, 0), (3, 0), (6, 60)):
        eng = HFEngine(model, tok, batch_size=batch_size, quiet=True, batch_tokens=budget)
        torch.manual_seed(batch_size)  # the global generator plays no part
        outs.append([(c.text, c.num_tokens) for c in eng.generate(chats(), params)])
    assert all(o == outs[0] for o in outs[1:])
    other = HFEngine(model, tok, batch_size=6, quiet=True).generate(chats(), dataclasses.replace(params, seed=8))
    assert [(c.text, c.num_tokens) for c in other] != outs[0]
