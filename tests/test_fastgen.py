"""benchmarks/fastgen.py, the fast decode path (static cache, fixed routing), against plain ``generate``, on CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import fastgen  # noqa: E402  (benchmarks/fastgen.py)

from prism_persona.models import encode_prompts, load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


PROMPTS = ["hello there", "a much longer prompt, with more words in it", "x", "write a poem about rain"]


@pytest.fixture
def fresh(tiny_model_dir):
    """A private copy of the tiny model (tests here inject adapters into it)."""
    model, tok = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    enc = encode_prompts(tok, PROMPTS)
    return model, tok, enc["input_ids"], enc["attention_mask"]


def settings(tok, n=10, **kw):
    return fastgen.DecodeSettings(max_new_tokens=n, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw)


def random_lora(model):
    import peft

    cfg = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        layers_to_transform=[1, 2],
        init_lora_weights=False,
    )
    torch.manual_seed(0)
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 1.0 / p.shape[1] ** 0.5)
    return pm.eval()


def test_prompt_positions_match_generate_rule():
    from prism_persona.gated.features import position_ids_from_mask

    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


def test_greedy_equals_plain_generate_base(fresh):
    model, tok, ids, mask = fresh
    s = settings(tok, 12, ignore_eos=True)
    fast = fastgen.generate(model, ids, mask, s)
    plain = fastgen.generate(model, ids, mask, s, fast=False)
    assert fast.shape == (len(PROMPTS), 12)
    assert torch.equal(fast, plain)


def test_eos_stops_and_pads_like_generate(fresh):
    model, tok, ids, mask = fresh
    first = fastgen.generate(model, ids, mask, settings(tok, 6, ignore_eos=True))
    eos = int(first[0, 2])  # a token row 0 emits: treat it as EOS, so that row stops early
    s = fastgen.DecodeSettings(max_new_tokens=6, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    fast = fastgen.generate(model, ids, mask, s)
    plain = fastgen.generate(model, ids, mask, s, fast=False)
    assert torch.equal(fast, plain)
    stop = fast[0].tolist().index(eos)
    assert stop <= 2 and all(t == tok.pad_token_id for t in fast[0, stop + 1 :].tolist())


def test_greedy_equals_plain_always_on_lora_and_peft_mixed(fresh):
    model, tok, ids, mask = fresh
    with torch.no_grad():
        base = fastgen.generate(model, ids, mask, settings(tok, 8, ignore_eos=True), fast=False)
    pm = random_lora(model)
    s = settings(tok, 8, ignore_eos=True)
    lora_plain = fastgen.generate(pm, ids, mask, s, fast=False)
    lora_fast = fastgen.generate(pm, ids, mask, s)
    assert torch.equal(lora_fast, lora_plain)
    assert not torch.equal(lora_plain, base)  # the adapter really changes the output
    names = ["default", "__base__", "default", "__base__"]
    mixed_fast = fastgen.generate(pm, ids, mask, s, forward_kwargs={"adapter_names": names})
    for i, n in enumerate(names):
        assert torch.equal(mixed_fast[i], (lora_plain if n == "default" else base)[i])


def test_gated_mixed_batch_fast_equals_plain_and_rows(fresh, tmp_path):
    from prism_persona.gated.gate import Gate, GateBundle
    from prism_persona.gated.model import GatedModel

    model, tok, ids, mask = fresh
    s = settings(tok, 8, ignore_eos=True)
    base = fastgen.generate(model, ids, mask, s, fast=False)
    pm = random_lora(model)
    lora = fastgen.generate(pm, ids, mask, s, fast=False)
    pm.save_pretrained(str(tmp_path / "adapter"))
    bare = pm.unload()
    torch.manual_seed(0)
    gm = GatedModel.from_parts(
        bare,
        tok,
        GateBundle(gate=Gate(bare.config.hidden_size, [128, 64], dropout=0.0, pooling="last"), threshold=0.5),
        str(tmp_path / "adapter"),
    )
    force = [True, False, False, True]
    fast, routed, probs = fastgen.generate_gated(gm, ids, mask, s, force=force)
    plain, routed_p, _ = fastgen.generate_gated(gm, ids, mask, s, force=force, fast=False)
    assert routed == force and routed_p == force and len(probs) == 4
    assert torch.equal(fast, plain)
    for i, r in enumerate(force):
        assert torch.equal(fast[i], (lora if r else base)[i])
    # the gate decides when not forced; decode keeps the prefill's decision
    _, routed_gate, probs_gate = fastgen.generate_gated(gm, ids, mask, s)
    assert routed_gate == [p >= 0.5 for p in probs_gate]


def test_sampling_is_seeded_and_top_p_keeps_the_top_token():
    logits = torch.tensor([[5.0, 1.0, 0.0, -1.0]] * 3)
    g = torch.Generator().manual_seed(0)
    assert fastgen.select_tokens(logits, 1.0, 0.01, g).tolist() == [0, 0, 0]
    assert fastgen.select_tokens(logits, 0.0, 1.0).tolist() == [0, 0, 0]
    a = fastgen.select_tokens(logits, 2.0, 1.0, torch.Generator().manual_seed(3))
    b = fastgen.select_tokens(logits, 2.0, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_sampled_generation_is_reproducible(fresh):
    model, tok, ids, mask = fresh
    s = settings(tok, 6, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    a = fastgen.generate(model, ids, mask, s)
    b = fastgen.generate(model, ids, mask, s)
    assert torch.equal(a, b) and a.shape == (4, 6)


def test_compiled_gated_decode_step_traces_as_one_graph(fresh, tmp_path):
    """The decode step, gate hook and per-row LoRA included, traces without graph breaks (dynamo with
    the eager backend on CPU; on CUDA the same step runs under ``mode="reduce-overhead"``)."""
    import torch._dynamo

    from prism_persona.gated.gate import Gate, GateBundle
    from prism_persona.gated.model import GatedModel

    model, tok, ids, mask = fresh
    pm = random_lora(model)
    pm.save_pretrained(str(tmp_path / "adapter"))
    bare = pm.unload()
    gm = GatedModel.from_parts(
        bare,
        tok,
        GateBundle(gate=Gate(bare.config.hidden_size, [128, 64], dropout=0.0, pooling="last")),
        str(tmp_path / "adapter"),
    )
    s = settings(tok, 5, ignore_eos=True)
    force = [False, True, True, False]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    dec = fastgen.FastDecoder(gm.model, compile=True, backend="eager")
    compiled, routed, _ = fastgen.generate_gated(gm, ids, mask, s, force=force, decoder=dec)
    plain, _, _ = fastgen.generate_gated(gm, ids, mask, s, force=force, fast=False)
    assert routed == force and torch.equal(compiled, plain)
    assert not torch._dynamo.utils.counters["graph_break"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
