"""Benchmark 7: the HF engine against a raw decode loop and the CPU's matmul bound, in one run.

The README's main command spends most of its time in the HF engine's ``generate`` (answers stage:
calls of ``model.batch_size`` chats, half of them carrying a ~60-word persona system prompt, 96 new
tokens; queries stage: 3 chats, up to 400 new tokens). This prints, measured in the same process:

- ``engine``: ``HFEngine.generate`` on such a workload, greedy, every row forced to ``--new-tokens``
  (EOS neither stops nor is suppressed), in calls of ``--call-size`` chats at engine batch ``--batch``;
- ``raw``: the model's own forward in a plain decode loop with a dynamic KV cache (prefill, then one
  token per step, argmax), on the *same* length-sorted, left-padded batches;
- ``raw_one_call``: the raw loop on every chat of the workload in one length-sorted batch (what
  packing a whole stage into one call would give);
- the CPU's bounds: the fp32 GFLOP/s of a 2048x2048 matmul, and of the model's own linear layers
  run as bare matmuls at the decode batch (weights streamed from memory as in a real step),
  each turned into tokens/s for this model (2 x matmul parameters FLOPs per token);
- the ratios, the padding share of each batch, the greedy agreement of engine and raw loop, and the
  1-minute load average before and after every timing (the machine is shared).

Every rate is per **CPU second** of this process (``time.process_time``; run it with one torch
thread, ``--threads 1``): on a machine shared with other jobs, wall time measures the other jobs,
while the CPU time this process was given measures the work. Wall seconds are printed beside it.

``--stages`` measures instead the engine at the README main command's real stage shapes, EOS and stop
strings on, the stages' own sampling settings and seeds (the tiny preset: engine batch 96): the
answers stage (``--rows`` chats, half with a persona, ``answers.max_new_tokens``) and the queries
stage (``one`` format: the bootstrap's own request chats, reply prefilled with its opener, stop at
"\\n", 48 tokens), each through ``model.generate`` (the engine before: stop strings applied after
generation, finished rows kept in the batch) and through the engine's own loop (rows stop inside it
and leave the batch), in the same process. Tokens are the tokens each row returns (up to its EOS or
stop string); the rate is per CPU second against the 2048^2-matmul bound measured in the same run.

``--pipeline`` measures the engine end to end as the answers and verification stages call it (the
tiny preset's shapes: seeded sampling, ``answers.max_new_tokens``; the self judge's log-prob calls on
both orders of every answer pair), before (calls of one engine batch, no token budget) and after (the
stages' calls of ``STREAM_BATCHES`` batches, streamed through one cache, within ``engine.batch_tokens``),
with the 2048^2-matmul bound measured in the same process; ``forward_of_bound`` counts every token a
forward ran (prompt and generated), the compute the CPU actually did.

``--quantize int8-dynamic,int8-weight`` measures the engine's opt-in int8 linears
(``engine.hf_quantize``, :mod:`prism_persona.engines.quantize`) against fp32 in the same process: the
model's own linear layers (hidden -> intermediate, intermediate -> hidden, the LM head) at
``--quant-rows`` rows, GFLOP/s and relative error; then the answers stage (``--rows`` chats, engine
batch ``--batch-sizes``, the default token budget) through the engine in fp32 and in each mode, with
the stage's seeded sampling and greedy: tokens per CPU second against the 2048^2-matmul bound, the
share of rows whose text equals fp32's, and the mean common prefix in tokens.

``--profile`` adds a torch-profiler table of one engine call (time per op family: matmul,
attention, cache, sampling, the rest) and a cProfile of its Python functions.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

# Short personas like the ones the embedded model writes (persona.use_length = "short", ~50-70 words).
PERSONAS = {
    "writing": (
        "You are a seasoned editor and creative writing coach with twenty years of experience in "
        "publishing. You help writers find their voice, tighten their prose and structure stories that "
        "hold a reader's attention. You give concrete, line-level suggestions, explain the craft behind "
        "them, and always keep the author's intent and style at the centre of your feedback."
    ),
    "coding": (
        "You are a senior software engineer who has shipped production systems in Python, Go and "
        "Rust. You write clear, idiomatic, well-tested code, explain trade-offs between approaches, "
        "point out edge cases, security issues and performance pitfalls, and prefer simple designs "
        "that a team can maintain. You answer with working code and a short explanation of why it works."
    ),
    "safety": (
        "You are a careful AI safety specialist. You help people with legitimate requests while "
        "recognising attempts to obtain dangerous, illegal or harmful information. You decline "
        "clearly and politely when a request could cause harm, explain the risk in plain words, and "
        "offer a safe, useful alternative whenever one exists, without lecturing or moralising."
    ),
}
QUERIES = {
    "writing": [
        "How can I make the opening paragraph of my short story more gripping?",
        "Can you suggest a better title for an essay about growing up in a small fishing town?",
        "What is the difference between showing and telling, with an example?",
        "Rewrite this sentence to be more concise: 'In my opinion I think that the results are good.'",
    ],
    "coding": [
        "How do I reverse a linked list in Python without using extra memory?",
        "What is the best way to read a large CSV file in chunks with pandas?",
        "Explain the difference between a process and a thread.",
        "Why does my recursive Fibonacci function get so slow for n above 35?",
    ],
    "safety": [
        "What household chemicals should never be mixed together?",
        "How can I tell if an email asking for my bank password is a phishing attempt?",
        "Is it safe to leave a phone charging overnight on my bed?",
        "What should I do if I find a stranger's medication on the street?",
    ],
}


def workload(rows: int) -> list[list[dict]]:
    """``rows`` chats as the answers stage builds them: for each query, the bare chat and the chat
    with its domain's persona as the system message (domains interleaved)."""
    from prism_persona.models import user_chat, with_persona

    pairs = [(d, q) for i in range(4) for d in PERSONAS for q in QUERIES[d][i : i + 1]]
    chats: list = []
    for k in range(rows // 2 + rows % 2):
        domain, query = pairs[k % len(pairs)]
        base = user_chat(query if k < len(pairs) else f"{query} (variant {k // len(pairs)})")
        chats += [base, with_persona(base, PERSONAS[domain], "system")]
    return chats[:rows]


def cpu_timed(fn, repeats: int = 1, warmup: int = 1) -> tuple[float, float, object]:
    """(median CPU seconds of this process, median wall seconds, the last result) over ``repeats``."""
    import statistics

    result = None
    for _ in range(max(0, warmup)):
        result = fn()
    cpu, wall = [], []
    for _ in range(max(1, repeats)):
        c0, w0 = time.process_time(), time.perf_counter()
        result = fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(cpu), statistics.median(wall), result


def load_avg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


@contextlib.contextmanager
def eos_ignored(engine):
    """Force every row to its full length: no EOS id reaches ``generate`` (neither stop nor suppress)."""
    gc = engine.model.generation_config
    saved_gc, saved_fn = gc.eos_token_id, engine._eos_ids
    gc.eos_token_id = None
    engine._eos_ids = lambda: []
    try:
        yield engine
    finally:
        gc.eos_token_id = saved_gc
        engine._eos_ids = saved_fn


# --------------------------------------------------------------------------------------------------
# the raw decode loop


def raw_decode(model, input_ids, attention_mask, new_tokens: int, cache=None):
    """Greedy tokens ``(B, new_tokens)``: prefill into ``cache`` (default: a dynamic cache, the one
    ``generate`` uses), then one forward per token."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config) if cache is None else cache
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    token = out.logits[:, -1, :].argmax(-1)
    rest = decode_steps(model, token, attention_mask, positions[:, -1:], cache, new_tokens - 1)
    return torch.cat([token[:, None], rest], dim=1)


def decode_steps(model, token, mask, pos, cache, steps: int):
    """``steps`` greedy tokens after ``token`` (whose position is ``pos``), one forward each."""
    import torch

    out_tokens = []
    for _ in range(steps):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        pos = pos + 1
        out = model(
            input_ids=token[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True
        )
        token = out.logits[:, -1, :].argmax(-1)
        out_tokens.append(token)
    return torch.stack(out_tokens, dim=1) if out_tokens else token.new_empty(token.shape[0], 0)


def sorted_batches(tokenizer, chats, batch: int):
    """(chat indices, encoded batch) in the engine's order: longest prompts first, left-padded."""
    from prism_persona.models import encode_prompts, render_chat

    texts = [render_chat(tokenizer, c) for c in chats]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    out = []
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        out.append((idx, encode_prompts(tokenizer, [texts[i] for i in idx], "cpu")))
    return out


def padding_share(batches) -> float:
    pad = sum(int((enc["attention_mask"] == 0).sum()) for _, enc in batches)
    total = sum(enc["attention_mask"].numel() for _, enc in batches)
    return pad / max(1, total)


def run_raw(model, tokenizer, chats, batch: int, new_tokens: int) -> dict:
    """Raw loop over the engine's batches; returns texts-free token rows in the caller's order."""
    import torch

    rows: list = [None] * len(chats)
    with torch.inference_mode():
        for idx, enc in sorted_batches(tokenizer, chats, batch):
            toks = raw_decode(model, enc["input_ids"], enc["attention_mask"], new_tokens)
            for r, i in enumerate(idx):
                rows[i] = toks[r].tolist()
    return {"rows": rows}


def run_engine(engine, chats, call_size: int, new_tokens: int) -> dict:
    """``HFEngine.generate`` in calls of ``call_size`` chats, EOS ignored, greedy; token rows in order."""
    from prism_persona.engines.base import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    texts = []
    with eos_ignored(engine):
        for start in range(0, len(chats), call_size):
            texts += [c.text for c in engine.generate(chats[start : start + call_size], params)]
    return {"texts": texts}


# --------------------------------------------------------------------------------------------------
# the CPU's bounds


def matmul_params(model) -> int:
    """Parameters that take part in a matmul per generated token: every Linear (the tied LM head too)."""
    from torch import nn

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def square_gflops(n: int = 2048, repeats: int = 5) -> float:
    """fp32 GFLOP/s of an ``n x n`` matmul (median of ``repeats``)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    sec, _, _ = cpu_timed(lambda: a @ b, repeats=repeats)
    return 2 * n**3 / sec / 1e9


def decode_shaped_gflops(model, batch: int, repeats: int = 3) -> float:
    """fp32 GFLOP/s of the model's own Linear weights as bare matmuls on a ``(batch, in)`` input:
    one decode step's linear work with its real memory traffic, nothing else."""
    import torch
    from torch import nn

    weights = [m.weight.detach() for m in model.modules() if isinstance(m, nn.Linear)]
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1]) for w in weights}

    def step():
        for w in weights:
            torch.nn.functional.linear(inputs[w.shape[1]], w)

    with torch.inference_mode():
        sec, _, _ = cpu_timed(step, repeats=repeats)
    return 2 * batch * sum(w.numel() for w in weights) / sec / 1e9


# --------------------------------------------------------------------------------------------------
# the cost of one decode step as the cache grows


def filled_cache(model, batch: int, length: int, preallocated: bool, room: int):
    """A KV cache already holding ``length`` random positions per row (a step's cost does not depend on
    the values): generate's dynamic cache, or the engine's preallocated one with ``room`` to grow."""
    import torch
    from transformers import DynamicCache

    from prism_persona.engines.kv_cache import preallocated_cache

    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    shape = (batch, cfg.num_key_value_heads, length, head_dim)
    cache = preallocated_cache(model, length + room) if preallocated else DynamicCache(config=cfg)
    for layer in range(cfg.num_hidden_layers):
        cache.update(torch.randn(shape), torch.randn(shape), layer)
    return cache


def step_cost(model, batch: int, length: int, preallocated: bool, steps: int = 8) -> float:
    """CPU milliseconds of one greedy decode step of ``batch`` rows whose cache holds ``length`` positions,
    with generate's dynamic cache (``torch.cat`` per step) or the engine's preallocated one."""
    import torch

    cache = filled_cache(model, batch, length, preallocated, steps + 1)
    token = torch.full((batch,), 5, dtype=torch.long)
    mask = torch.ones(batch, length, dtype=torch.long)
    pos = torch.full((batch, 1), length - 1)
    with torch.inference_mode():
        token = decode_steps(model, token, mask, pos, cache, 1)[:, 0]  # warm-up
        c0 = time.process_time()
        decode_steps(model, token, torch.ones(batch, length + 1, dtype=torch.long), pos + 1, cache, steps)
        return (time.process_time() - c0) / steps * 1000


def step_costs(model, batch: int, lengths: list[int], bound_tokens_per_s: float) -> list[dict]:
    """Per cache length: a step's CPU ms with each cache, the saving, and the preallocated step's
    tokens per CPU second as a share of the square-matmul bound."""
    rows = []
    for n in lengths:
        dyn, pre = step_cost(model, batch, n, False), step_cost(model, batch, n, True)
        tps = batch / (pre / 1000)
        rows.append(
            {
                "batch": batch,
                "cache_len": n,
                "dynamic_ms": dyn,
                "preallocated_ms": pre,
                "saved": 1 - pre / dyn,
                "tokens_per_cpu_s": tps,
                "of_square_bound": tps / bound_tokens_per_s,
            }
        )
    return rows


# --------------------------------------------------------------------------------------------------
# profile


OP_FAMILIES = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("attention", ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product", "aten::softmax")),
    ("cache_cat", ("aten::cat", "aten::index_select", "aten::index_copy")),
    ("sampling", ("aten::argmax", "aten::sort", "aten::multinomial", "aten::topk", "aten::cumsum")),
)


def profile_engine(engine, chats, call_size: int, new_tokens: int, top: int = 18) -> dict:
    """torch-profiler op families and cProfile's top Python functions of one engine call."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        run_engine(engine, chats[:call_size], call_size, new_tokens)
        wall = time.perf_counter() - t0
    fam = {name: 0.0 for name, _ in OP_FAMILIES}
    for ev in prof.key_averages():
        for name, prefixes in OP_FAMILIES:
            if any(ev.key == op or ev.key.startswith(op + "_") for op in prefixes):
                fam[name] += ev.self_cpu_time_total / 1e6
                break
    shares = {k: v / wall for k, v in fam.items()}
    shares["rest (python, masks, norms, rope, ...)"] = max(0.0, 1 - sum(shares.values()))
    print(f"\n## torch profiler: one engine call of {call_size} chats x {new_tokens} tokens, {wall:.1f} s")
    print(common.table([{"family": k, "share_of_wall": v} for k, v in shares.items()], ["family", "share_of_wall"]))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    pr = cProfile.Profile()
    pr.enable()
    run_engine(engine, chats[:call_size], call_size, new_tokens)
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(top)
    print("\n## cProfile (tottime) of the same call")
    print(buf.getvalue())
    return {"wall_s": wall, "shares": shares}


# --------------------------------------------------------------------------------------------------


def measure(built: common.Built, rows: int, batch: int, call_size: int, new_tokens: int, repeats: int) -> dict:
    from prism_persona.engines.hf import HFEngine

    chats = workload(rows)
    engine = HFEngine(built.model, built.tokenizer, batch_size=batch, quiet=True)
    tokens = rows * new_tokens
    res: dict = {"rows": rows, "batch": batch, "call_size": call_size, "new_tokens": new_tokens}

    def timed(name, fn):
        load0 = load_avg()
        sec, wall, out = cpu_timed(fn, repeats=repeats, warmup=0)
        res[name] = {
            "cpu_seconds": sec,
            "wall_seconds": wall,
            "tokens_per_s": tokens / sec,
            "load_before": load0,
            "load_after": load_avg(),
        }
        return out

    eng = timed("engine", lambda: run_engine(engine, chats, call_size, new_tokens))
    raw = timed("raw", lambda: run_raw(built.model, built.tokenizer, chats, batch, new_tokens))
    timed("raw_one_call", lambda: run_raw(built.model, built.tokenizer, chats, rows, new_tokens))
    raw_texts = [built.tokenizer.decode(r, skip_special_tokens=True).strip() for r in raw["rows"]]
    res["greedy_agreement"] = sum(a == b for a, b in zip(eng["texts"], raw_texts)) / max(1, rows)
    res["padding_share"] = padding_share(sorted_batches(built.tokenizer, chats, batch))
    res["padding_share_one_call"] = padding_share(sorted_batches(built.tokenizer, chats, rows))
    return res


def bounds(model, batch: int) -> dict:
    n = matmul_params(model)
    load0 = load_avg()
    sq = square_gflops()
    dec = decode_shaped_gflops(model, batch)
    return {
        "matmul_params": n,
        "square_gflops": sq,
        "decode_shaped_gflops": dec,
        "square_bound_tokens_per_s": sq * 1e9 / (2 * n),
        "decode_bound_tokens_per_s": dec * 1e9 / (2 * n),
        "load_before": load0,
        "load_after": load_avg(),
    }


def ratio_rows(res: dict, bnd: dict) -> list[dict]:
    out = []
    for name in ("engine", "raw", "raw_one_call"):
        tps = res[name]["tokens_per_s"]
        out.append(
            {
                "variant": name,
                "tokens_per_s": tps,
                "wall_s": res[name]["wall_seconds"],
                "vs_engine": tps / res["engine"]["tokens_per_s"],
                "of_square_bound": tps / bnd["square_bound_tokens_per_s"],
                "of_decode_bound": tps / bnd["decode_bound_tokens_per_s"],
                "load_1m": f"{res[name]['load_before']}->{res[name]['load_after']}",
            }
        )
    return out


def stage_workloads(rows: int) -> list[tuple[str, list, object]]:
    """(stage, chats, SamplingParams) of the README main command's generation stages (tiny preset)."""
    from prism_persona import config
    from prism_persona.bootstrap.queries import ONE_REQUEST_TOKENS, round_chats
    from prism_persona.engines.base import SamplingParams

    cfg = config.resolve("tiny")
    a, q = cfg.answers, cfg.queries
    answers = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, seed=11)
    requests = [chat for d in PERSONAS for chat, _ in round_chats(cfg, d, PERSONAS[d], q.queries_per_persona, 0, True)]
    queries = SamplingParams(
        max_new_tokens=min(q.max_new_tokens, ONE_REQUEST_TOKENS),
        temperature=q.temperature,
        top_p=q.top_p,
        seed=12,
        stop=("\n",),
    )
    return [("answers", workload(rows), answers), ("queries (one, stop \\n)", requests, queries)]


def kit_workloads(rows: int) -> list[tuple[str, list, object]]:
    """The method tests' answers stage (tests/examples/test_safety_kit.py: greedy, 24 new tokens, engine
    batch 16): more chats than the batch, so the engine's own loop streams them through one cache."""
    from prism_persona.engines.base import SamplingParams

    return [("answers greedy, 24 tokens", workload(rows), SamplingParams(max_new_tokens=24, temperature=0.0))]


def measure_stages(built: common.Built, rows: int, batch: int, repeats: int, kit: bool = False) -> list[dict]:
    """Per stage: ``generate`` (the engine before) vs the engine's own loop, tokens returned per CPU s."""
    from prism_persona.engines.hf import HFEngine

    out = []
    for stage, chats, params in (kit_workloads if kit else stage_workloads)(rows):
        texts = {}
        for variant in ("generate (before)", "own loop (after)"):
            engine = HFEngine(built.model, built.tokenizer, batch_size=batch, quiet=True)
            if variant.startswith("generate"):
                engine._own_loop_exact = lambda p: False  # type: ignore[method-assign]
            load0 = load_avg()

            def call(engine=engine):
                engine.tokens_generated = 0
                return engine.generate(chats, params)

            sec, wall, comps = cpu_timed(call, repeats=repeats, warmup=0)
            returned = sum(c.num_tokens + (c.finish_reason == "stop") for c in comps)
            texts[variant] = [c.text for c in comps]
            out.append(
                {
                    "stage": stage,
                    "variant": variant,
                    "chats": len(chats),
                    "max_new": params.max_new_tokens,
                    "tokens": returned,
                    "cpu_s": sec,
                    "wall_s": wall,
                    "tokens_per_cpu_s": returned / sec,
                    "load_1m": f"{load0}->{load_avg()}",
                }
            )
        a, b = texts.values()
        out[-1]["same_texts"] = out[-2]["same_texts"] = f"{sum(x == y for x, y in zip(a, b))}/{len(a)}"
        # the same texts are delivered by both: count the tokens the rows return (up to EOS or the stop
        # string, the own loop's count) for both; "decoded" is the engine's own count (before: a row cut by a
        # stop string counted its whole budget)
        for r in out[-2:]:
            r["decoded"], r["tokens"] = r["tokens"], out[-1]["tokens"]
            r["tokens_per_cpu_s"] = r["tokens"] / r["cpu_s"]
    return out


def pipeline_stage_rows(
    built: common.Built, rows: int, batch: int, repeats: int, variant: str, answers_texts: Optional[list] = None
) -> tuple[list[dict], list]:
    """The engine end to end as the bootstrap calls it, at the README main command's shapes (tiny
    preset): the answers stage (``rows`` chats, half with a persona, the stage's seeded sampling and
    token budget) and the verification stage (the self judge's log-prob calls on both orders of every
    (persona, base) answer pair). ``variant``: ``before`` = calls of one engine batch, no token budget
    (the stages' batching until 2026-12-07); ``after`` = the stages' calls now (``STREAM_BATCHES``
    batches streamed through one cache) and the engine's ``engine.batch_tokens`` budget. Tokens:
    generated tokens (answers), prompt tokens scored (verification), and all tokens a forward ran."""
    from prism_persona import config
    from prism_persona.bootstrap.answers import STREAM_BATCHES
    from prism_persona.engines.base import SamplingParams
    from prism_persona.engines.hf import HFEngine
    from prism_persona.judges.pairwise import PairItem, judge_chat
    from prism_persona.models import render_chat

    cfg = config.resolve("tiny")
    a = cfg.answers
    after = variant == "after"
    budget = cfg.engine.batch_tokens if after else 0
    call = STREAM_BATCHES * batch if after else batch
    engine = HFEngine(built.model, built.tokenizer, batch_size=batch, quiet=True, batch_tokens=budget)
    chats = workload(rows)

    def prompt_tokens(cs) -> int:
        return sum(
            len(built.tokenizer(render_chat(built.tokenizer, c), add_special_tokens=False)["input_ids"]) for c in cs
        )

    def answers():
        out = []
        for k, start in enumerate(range(0, len(chats), call)):
            params = SamplingParams(a.max_new_tokens, a.temperature, a.top_p, seed=11 + k)
            out += engine.generate(chats[start : start + call], params)
        return out

    load0 = load_avg()
    sec, wall, comps = cpu_timed(answers, repeats=repeats, warmup=0)
    gen = sum(c.num_tokens + (c.finish_reason == "stop") for c in comps)
    prompts = prompt_tokens(chats)
    out = [
        {
            "stage": "answers",
            "variant": variant,
            "chats": len(chats),
            "call": call,
            "batch_tokens": budget or 0,
            "tokens": gen,
            "forward_tokens": gen + prompts,
            "cpu_s": sec,
            "wall_s": wall,
            "load_1m": f"{load0}->{load_avg()}",
        }
    ]
    texts = answers_texts or [c.text for c in comps]
    items = []
    for i in range(0, len(chats) - 1, 2):  # (base, persona) chats of one query: both orders
        q = chats[i][-1]["content"]
        items += [PairItem(q, texts[i + 1], texts[i]), PairItem(q, texts[i], texts[i + 1])]
    jchats = [judge_chat(it, "logprob") for it in items]

    def verify():
        res = []
        for start in range(0, len(jchats), call):
            res += engine.score_choices(jchats[start : start + call], ["A", "B"])
        return res

    load0 = load_avg()
    sec, wall, scores = cpu_timed(verify, repeats=repeats, warmup=0)
    scored = prompt_tokens(jchats)
    out.append(
        {
            "stage": "verification (logprob)",
            "variant": variant,
            "chats": len(jchats),
            "call": call,
            "batch_tokens": budget or 0,
            "tokens": scored,
            "forward_tokens": scored,
            "cpu_s": sec,
            "wall_s": wall,
            "load_1m": f"{load0}->{load_avg()}",
        }
    )
    out[0]["texts"], out[1]["scores"] = [c.text for c in comps], scores
    return out, texts


def measure_pipeline(built: common.Built, rows: int, batch: int, repeats: int) -> list[dict]:
    """``before`` and ``after`` of :func:`pipeline_stage_rows`, the judge scoring the same answers."""
    before, texts = pipeline_stage_rows(built, rows, batch, repeats, "before")
    after, _ = pipeline_stage_rows(built, rows, batch, repeats, "after", answers_texts=texts)
    for b, a in zip(before, after):
        if "scores" in b:
            same = sum(all(abs(x[k] - y[k]) < 1e-3 for k in x) for x, y in zip(b.pop("scores"), a.pop("scores")))
        else:
            same = sum(x == y for x, y in zip(b.pop("texts"), a.pop("texts")))
        a["same"] = b["same"] = f"{same}/{b['chats']}"
    rows_out = []
    for b, a in zip(before, after):
        rows_out += [b, a]
    return rows_out


def linear_rates(model, modes: list[str], rows: list[int], repeats: int = 5) -> list[dict]:
    """fp32 vs each int8 mode on the model's own linears (first layer's up and down projections, the LM head)
    at ``rows`` input rows: GFLOP/s per CPU second and the output's relative error against fp32."""
    import torch

    from prism_persona.engines.quantize import _int8_linear

    layer = model.model.layers[0].mlp
    out = []
    for name, lin in (("up_proj", layer.up_proj), ("down_proj", layer.down_proj), ("lm_head", model.lm_head)):
        variants = {"fp32": lin, **{mode: _int8_linear(lin, mode) for mode in modes}}
        for m in rows:
            x = torch.randn(m, lin.in_features, generator=torch.Generator().manual_seed(m))
            flops = 2 * m * lin.in_features * lin.out_features
            reps = max(repeats, min(300, int(5e8 / flops)))
            row = {"layer": f"{name} {lin.in_features}->{lin.out_features}", "rows": m}
            with torch.inference_mode():
                ref = lin(x)
                for v, mod in variants.items():
                    sec, _, y = cpu_timed(lambda mod=mod: [mod(x) for _ in range(reps)][-1], repeats=3)
                    row[f"{v}_gflops"] = flops * reps / sec / 1e9
                    if v != "fp32":
                        row[f"{v}_rel_err"] = float((y - ref).norm() / ref.norm())
            out.append(row)
    return out


def common_prefix(tokenizer, a: str, b: str) -> int:
    """Tokens the two texts share from the start."""
    x, y = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (a, b))
    n = 0
    while n < min(len(x), len(y)) and x[n] == y[n]:
        n += 1
    return n


def measure_quantized(built: common.Built, rows: int, batch: int, repeats: int, modes: list[str]) -> list[dict]:
    """The answers stage (tiny preset: ``rows`` chats, half with a persona; the stage's seeded sampling, and
    greedy at the same budget) through the engine in fp32 and with each ``engine.hf_quantize`` mode, in one
    call as the stage streams it (the default ``engine.hf_batch_tokens``)."""
    from prism_persona import config
    from prism_persona.engines.base import SamplingParams
    from prism_persona.engines.hf import HFEngine

    a = config.resolve("tiny").answers
    chats = workload(rows)
    out, ref = [], {}
    for mode in ["off", *modes]:
        engine = HFEngine(built.model, built.tokenizer, batch_size=batch, quiet=True, quantize=mode)
        for kind, params in (
            ("sampled", SamplingParams(a.max_new_tokens, a.temperature, a.top_p, seed=11)),
            ("greedy", SamplingParams(a.max_new_tokens, 0.0)),
        ):
            load0 = load_avg()
            sec, wall, comps = cpu_timed(lambda e=engine, p=params: e.generate(chats, p), repeats=repeats, warmup=0)
            texts = [c.text for c in comps]
            ref.setdefault(kind, texts)
            prefix = [common_prefix(built.tokenizer, x, y) for x, y in zip(texts, ref[kind])]
            tokens = sum(c.num_tokens + (c.finish_reason == "stop") for c in comps)
            out.append(
                {
                    "quantize": mode,
                    "decoding": kind,
                    "chats": len(chats),
                    "tokens": tokens,
                    "cpu_s": sec,
                    "wall_s": wall,
                    "tokens_per_cpu_s": tokens / sec,
                    "same_as_fp32": f"{sum(x == y for x, y in zip(texts, ref[kind]))}/{len(texts)}",
                    "mean_prefix": sum(prefix) / len(prefix),
                    "load_1m": f"{load0}->{load_avg()}",
                }
            )
        del engine
    return out


def bounded(built, measure_fn):
    """``(rows, bound, bound_after)``: ``measure_fn()`` between two measurements of the 2048^2 fp32 matmul
    bound in this process, in tokens per CPU second of ``built``'s model (the rates are read against it)."""
    per_token = 2 * matmul_params(built.model)
    bound = square_gflops() * 1e9 / per_token
    rows = measure_fn()
    return rows, bound, square_gflops() * 1e9 / per_token


def main(argv: Optional[list] = None) -> dict:
    p = common.base_parser(__doc__.splitlines()[0], batch_sizes="12", new_tokens=96, repeats=1)
    p.add_argument("--rows", type=int, default=24, help="chats in the workload (half with a persona; 0 = skip)")
    p.add_argument("--call-size", type=int, default=0, help="chats per engine call (0 = the engine batch)")
    p.add_argument("--profile", action="store_true", help="also profile one engine call")
    p.add_argument(
        "--stages",
        action="store_true",
        help="measure the engine before/after at the main command's stage shapes (answers, queries) instead",
    )
    p.add_argument(
        "--pipeline",
        action="store_true",
        help="measure the engine end to end as the answers and verification stages call it (tiny preset shapes), "
        "before/after, against the bound measured in the same process",
    )
    p.add_argument(
        "--kit",
        action="store_true",
        help="with --stages: the method tests' greedy answers stage instead (use --batch-sizes 16)",
    )
    p.add_argument(
        "--quantize",
        default="",
        help="measure these engine.hf_quantize modes (comma-separated: int8-dynamic,int8-weight) against fp32: the "
        "model's linears, then the answers stage (--rows, --batch-sizes), speed and agreement with fp32's texts",
    )
    p.add_argument("--quant-rows", default="1,16,72", help="with --quantize: input rows of the single-linear timings")
    p.add_argument(
        "--step-lengths",
        default="",
        help="also time one decode step at these cache lengths (comma-separated), dynamic vs preallocated cache",
    )
    args = p.parse_args(argv)
    dev, dtype = common.pick("cpu", "float32", args.threads)
    if args.size == "7b":
        raise SystemExit("bench_cpu_engine measures the CPU engine: use --size embedded (or tiny for a smoke run)")
    built = common.build_model(args.size, dev, dtype, seed=args.seed)
    settings = {
        "size": args.size,
        "model": built.label,
        "rows": args.rows,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "threads": args.threads,
    }
    common.print_header("CPU engine vs raw decode loop vs matmul bound", built, settings)
    results = []
    if args.quantize:
        modes = [m.strip() for m in args.quantize.split(",") if m.strip()]
        b = common.batch_sizes(args.batch_sizes)[0]
        linears = linear_rates(built.model, modes, common.batch_sizes(args.quant_rows))
        print(f"\n## the model's linears, fp32 vs {', '.join(modes)}: GFLOP/s per CPU s (load {load_avg()})")
        cols = ["layer", "rows", "fp32_gflops"] + [f"{m}_{k}" for m in modes for k in ("gflops", "rel_err")]
        print(common.table(linears, cols))
        stage, square, square_after = bounded(
            built, lambda: measure_quantized(built, args.rows, b, args.repeats, modes) if args.rows else []
        )
        for r in stage:
            r["of_square_bound"] = r["tokens_per_cpu_s"] / square
        print(
            f"\n## the answers stage, engine batch {b}, fp32 vs int8; 2048^2 matmul bound {square:.0f} tokens per "
            f"CPU s ({square_after:.0f} after the runs)"
        )
        cols = ["quantize", "decoding", "chats", "tokens", "cpu_s", "wall_s", "tokens_per_cpu_s", "of_square_bound"]
        print(common.table(stage, cols + ["same_as_fp32", "mean_prefix", "load_1m"]))
        results.append({"linears": linears, "answers": stage, "square_bound_tokens_per_s": [square, square_after]})
        common.record(args.out, "cpu_engine", settings, results)
        return {"settings": settings, "results": results}
    if args.pipeline:
        b = common.batch_sizes(args.batch_sizes)[0]
        rows, square, square_after = bounded(built, lambda: measure_pipeline(built, args.rows, b, args.repeats))
        for r in rows:
            r["tokens_per_cpu_s"] = r["tokens"] / r["cpu_s"]
            r["of_square_bound"] = r["tokens_per_cpu_s"] / square
            r["forward_of_bound"] = r["forward_tokens"] / r["cpu_s"] / square
        print(
            f"\n## the engine as the stages call it, engine batch {b}; 2048^2 matmul bound {square:.0f} tokens per "
            f"CPU s ({square_after:.0f} after the runs)"
        )
        cols = ["stage", "variant", "chats", "call", "batch_tokens", "tokens", "forward_tokens", "cpu_s", "wall_s"]
        cols += ["tokens_per_cpu_s", "of_square_bound", "forward_of_bound", "same", "load_1m"]
        print(common.table(rows, cols))
        results.append({"pipeline": rows, "square_bound_tokens_per_s": [square, square_after]})
        common.record(args.out, "cpu_engine", settings, results)
        return {"settings": settings, "results": results}
    if args.stages:
        b = common.batch_sizes(args.batch_sizes)[0]
        stages, square, square_after = bounded(
            built, lambda: measure_stages(built, args.rows, b, args.repeats, kit=args.kit)
        )
        for r in stages:
            r["of_square_bound"] = r["tokens_per_cpu_s"] / square
        print(
            f"\n## the main command's stages, engine batch {b}; 2048^2 matmul bound {square:.0f} tokens per CPU s "
            f"({square_after:.0f} after the runs)"
        )
        cols = ["stage", "variant", "chats", "max_new", "decoded", "tokens", "cpu_s", "wall_s", "tokens_per_cpu_s"]
        print(common.table(stages, cols + ["of_square_bound", "same_texts", "load_1m"]))
        results.append({"stages": stages, "square_bound_tokens_per_s": [square, square_after]})
        common.record(args.out, "cpu_engine", settings, results)
        return {"settings": settings, "results": results}
    for b in common.batch_sizes(args.batch_sizes) if args.rows else []:  # --rows 0: the step costs only
        call = args.call_size or b
        res = measure(built, args.rows, b, call, args.new_tokens, args.repeats)
        bnd = bounds(built.model, b)
        res["bounds"] = bnd
        print(
            f"\n## batch {b}, calls of {call} chats, {args.rows} chats x {args.new_tokens} new tokens "
            f"(padding {res['padding_share']:.0%} of prompt tokens; one call {res['padding_share_one_call']:.0%})"
        )
        print(
            f"bound: 2048^2 matmul {bnd['square_gflops']:.1f} GFLOP/s -> {bnd['square_bound_tokens_per_s']:.0f} tokens/s; "
            f"the model's linears at batch {b}: {bnd['decode_shaped_gflops']:.1f} GFLOP/s -> "
            f"{bnd['decode_bound_tokens_per_s']:.0f} tokens/s ({bnd['matmul_params'] / 1e6:.1f} M matmul params; "
            f"load {bnd['load_before']}->{bnd['load_after']})"
        )
        rows = ratio_rows(res, bnd)
        print(
            common.table(
                rows,
                ["variant", "tokens_per_s", "wall_s", "vs_engine", "of_square_bound", "of_decode_bound", "load_1m"],
            )
        )
        print(f"greedy agreement engine vs raw loop: {res['greedy_agreement']:.2f}")
        results.append(res)
        if args.profile:
            engine = __import__("prism_persona.engines.hf", fromlist=["HFEngine"]).HFEngine(
                built.model, built.tokenizer, batch_size=b, quiet=True
            )
            res["profile"] = profile_engine(engine, workload(args.rows), call, args.new_tokens)
    if args.step_lengths:
        square = square_gflops() * 1e9 / (2 * matmul_params(built.model))
        print(f"\n2048^2 matmul bound: {square:.0f} tokens per CPU second (load {load_avg()})")
        for b in common.batch_sizes(args.batch_sizes):
            steps = step_costs(built.model, b, common.batch_sizes(args.step_lengths), square)
            print(f"\n## one decode step, batch {b}: CPU ms by cache length (load {load_avg()})")
            cols = [
                "batch",
                "cache_len",
                "dynamic_ms",
                "preallocated_ms",
                "saved",
                "tokens_per_cpu_s",
                "of_square_bound",
            ]
            print(common.table(steps, cols))
            results.append({"step_costs": steps})
    common.record(args.out, "cpu_engine", settings, results)
    return {"settings": settings, "results": results}


if __name__ == "__main__":
    main()
