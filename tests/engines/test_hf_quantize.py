"""engine.hf_quantize: the in-process engine's opt-in int8 linears (engines/quantize.py)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from prism_persona import config as C
from prism_persona.engines import SamplingParams
from prism_persona.engines import hf as hf_engine
from prism_persona.engines.hf import HFEngine
from prism_persona.engines.quantize import WeightInt8Linear, _dynamic_class, quantized_copy
from prism_persona.errors import PrismError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHATS = [[{"role": "user", "content": q}] for q in ("hi", "a longer question about things", "tell me more", "x")]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _cfg(mode: str, **model):
    cfg = C.resolve("tiny")
    return dataclasses.replace(
        cfg,
        quiet=True,
        engine=dataclasses.replace(cfg.engine, hf_quantize=mode),
        model=dataclasses.replace(cfg.model, **model),
    )


def test_off_by_default_and_off_runs_the_model_itself(tiny_model):
    model, tok = tiny_model
    assert C.EngineConfig().hf_quantize == "off"
    engine = hf_engine.build(_cfg("off"), model, tok)
    assert engine.model is model and engine.quantize == "off"
    plain = HFEngine(model, tok, batch_size=4, quiet=True)
    assert [c.text for c in engine.generate(CHATS, GREEDY)] == [c.text for c in plain.generate(CHATS, GREEDY)]


def test_the_pipelines_engine_on_a_shared_model_quantizes_a_copy(tiny_model):
    from prism_persona.engines import make_engine

    model, tok = tiny_model
    before = _snapshot(model)
    engine = make_engine(_cfg("int8-dynamic"), model, tok)  # what the pipeline does with its shared model
    assert engine.quantize == "int8-dynamic" and engine.model is not model
    assert isinstance(engine.model.model.layers[0].self_attn.q_proj, _dynamic_class())
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear  # the trainer's model stays fp32
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("mode, fp32_linears", [("int8-dynamic", {"down_proj"}), ("int8-weight", set())])
def test_the_copy_quantizes_linears_and_shares_every_other_tensor(tiny_model, mode, fp32_linears):
    model, _ = tiny_model
    before = _snapshot(model)
    q = quantized_copy(model, mode)
    kind = _dynamic_class() if mode == "int8-dynamic" else WeightInt8Linear
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        copied = q.get_submodule(name)
        if name.rpartition(".")[2] in fp32_linears:
            assert type(copied) is nn.Linear and copied.weight is module.weight  # shared, not copied
        else:
            assert isinstance(copied, kind)
    assert q.model.embed_tokens.weight is model.model.embed_tokens.weight
    assert q.model.norm.weight is model.model.norm.weight
    # the original is untouched: its modules, its values, its grad flags
    assert all(type(m) is not kind for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_a_tied_lm_head_is_quantized_without_touching_the_embedding():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg).eval()
    emb = model.model.embed_tokens.weight
    assert model.lm_head.weight is emb  # tied
    saved = emb.detach().clone()
    ids = torch.randint(0, 96, (2, 7))
    with torch.inference_mode():
        ref = model(input_ids=ids).logits
        q = quantized_copy(model, "int8-dynamic")
        out = q(input_ids=ids).logits
    assert isinstance(q.lm_head, _dynamic_class())
    assert q.model.embed_tokens.weight is emb and torch.equal(emb, saved)  # the input embedding is fp32, unchanged
    assert model.lm_head.weight is emb and type(model.lm_head) is nn.Linear
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 0.05, rel  # int8: not fp32's logits, but close (measured ~0.01)


@pytest.mark.parametrize("mode, limit", [("int8-dynamic", 0.1), ("int8-weight", 0.05)])
def test_the_int8_engine_generates_and_scores_close_to_fp32(tiny_model, mode, limit):
    model, tok = tiny_model
    fp32 = HFEngine(model, tok, batch_size=4, quiet=True)
    int8 = HFEngine(model, tok, batch_size=4, quiet=True, quantize=mode)
    assert int8.model is not model
    calls = []
    real = int8._decode
    int8._decode = lambda *a: calls.append(1) or real(*a)  # type: ignore[method-assign]
    ref, got = fp32.generate(CHATS, GREEDY), int8.generate(CHATS, GREEDY)
    assert calls  # the engine's own loop (preallocated cache) ran on the int8 copy
    assert len(got) == len(CHATS) and all(0 < c.num_tokens <= 12 for c in got)
    # the first token of every row (one forward of int8 matmuls) is fp32's on this model; later ones may drift
    first = [tok(c.text, add_special_tokens=False)["input_ids"][:1] for c in ref]
    assert [tok(c.text, add_special_tokens=False)["input_ids"][:1] for c in got] == first
    # the engine's own loop on the int8 model gives generate's tokens on it (the loop is exact for any model)
    plain = HFEngine(int8.model, tok, batch_size=4, quiet=True)
    plain._own_loop_exact = lambda p: False  # type: ignore[method-assign]
    assert [c.text for c in plain.generate(CHATS, GREEDY)] == [c.text for c in got]
    # log-prob scores (the self judge) differ from fp32's by a little
    a, b = fp32.score_choices(CHATS, ["A", "B"]), int8.score_choices(CHATS, ["A", "B"])
    assert max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in x) < limit
    assert a != b


def test_unsupported_models_and_settings_are_one_line_errors(tiny_model, tiny_model_dir):
    model, tok = tiny_model
    with pytest.raises(PrismError, match="float32 model"):
        quantized_copy(copy.deepcopy(model).to(torch.bfloat16), "int8-dynamic")
    with pytest.raises(PrismError, match="unknown mode 'int4'"):
        HFEngine(model, tok, quantize="int4")
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(PrismError, match="LoRA adapters"):
        HFEngine(peft, tok, quantize="int8-dynamic")
    cfg = _cfg("int8-dynamic", model=str(tiny_model_dir), device="cuda")
    with pytest.raises(PrismError, match="model.device cpu and model.dtype float32"):
        hf_engine.check(cfg)
    hf_engine.check(_cfg("int8-dynamic", model=str(tiny_model_dir), device="cpu"))
    with pytest.raises(PrismError, match="hf_quantize"):
        C.resolve(overrides={"persona": {"domains": ["a"]}, "engine": {"hf_quantize": "int4"}})


def test_the_benchmark_measures_int8_against_fp32(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import bench_cpu_engine

    argv = ["--size", "tiny", "--rows", "4", "--batch-sizes", "4", "--threads", "1", "--quant-rows", "1,3"]
    res = bench_cpu_engine.main(argv + ["--quantize", "int8-dynamic,int8-weight", "--out", str(tmp_path / "r.jsonl")])
    got = res["results"][0]
    assert [(r["layer"].split()[0], r["rows"]) for r in got["linears"]] == [
        (name, m) for name in ("up_proj", "down_proj", "lm_head") for m in (1, 3)
    ]
    for r in got["linears"]:
        assert r["fp32_gflops"] > 0 and all(0 < r[f"{m}_rel_err"] < 0.05 for m in ("int8-dynamic", "int8-weight"))
    rows = {(r["quantize"], r["decoding"]): r for r in got["answers"]}
    assert set(rows) == {(m, d) for m in ("off", "int8-dynamic", "int8-weight") for d in ("sampled", "greedy")}
    for d in ("sampled", "greedy"):
        assert rows["off", d]["same_as_fp32"] == "4/4" and rows["off", d]["mean_prefix"] > 0  # fp32 vs itself
        assert all(rows[m, d]["mean_prefix"] <= rows["off", d]["mean_prefix"] for m in ("int8-dynamic", "int8-weight"))
    assert rows["off", "greedy"]["of_square_bound"] > 0


def test_int8_dynamic_rows_depend_on_the_rows_batched_with_them(tiny_model):
    """The documented cost of one activation scale per tensor: fp32's logits of a row do not change when another
    row joins the batch; int8-dynamic's do (the scale is the batch's)."""
    model, _ = tiny_model
    q = quantized_copy(model, "int8-dynamic")
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randint(5, 200, (1, 9), generator=gen), torch.randint(5, 200, (1, 9), generator=gen)
    with torch.inference_mode():
        diff = {
            name: float((m(input_ids=a).logits - m(input_ids=torch.cat([a, b])).logits[:1]).abs().max())
            for name, m in (("fp32", model), ("int8", q))
        }
    assert diff["fp32"] == 0 and diff["int8"] > 0, diff
