"""Benchmark: the distillation step against the CPU's fp32 matmul bound, before and after the teacher cache.

The README's first command (``prism run --example safety``) distils on the safety kit's winning answers:
the tiny preset's settings (batch 4, top-k 32, ``kl+ce``, LoRA r 8 on every linear of layers 1..L-1),
a teacher prompt with the ~60-word safety persona (~100 tokens), a student prompt without it (~70) and
~25 answer tokens. This builds such examples from the kit's own queries and persona (answers: a refusal
or a short factual sentence, alternating) and measures, in one process:

- ``profile``: one step cut into its parts (teacher forward + top-k, student forward, loss, backward,
  optimiser), CPU seconds each, for the whole batch in one pass;
- ``recompute`` (before): every step runs the teacher on its batch (padded, one pass), then the
  student forward and backward, as distillation did before the cache;
- ``cached``: the teacher's top-k computed once per example (:class:`TeacherCache`, timed and counted),
  then every step runs the student only, in micro-batches of ``distill.micro_tokens`` padded tokens;
- ``cached_whole_batch``: the cache with the batch in one pass (separates the two changes);
- the bound: fp32 GFLOP/s of a 2048^2 matmul in this process; a variant's share is the matmul FLOPs
  of its real (unpadded) tokens - 2 x parameters per token forward, twice that for the student's
  backward, the LM head on answer tokens only - per CPU second, over the bound;
- the peak RSS of each variant above the RSS it started from (Linux: ``/proc/self/clear_refs``);
- the loss of every step next to the ``recompute`` one (same LoRA start, same dropout draws), and
  the KL error of storing the cached values in float16 or bfloat16 instead of float32.

Rates are per CPU second of this process (``--threads 1`` is steadier on a shared machine).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from bench_cpu_engine import load_avg, matmul_params, square_gflops  # noqa: E402

ANSWERS = (
    "I'm sorry, but I can't help with that. It could seriously hurt people and it is illegal.",
    "Bleach and ammonia react to release chloramine gas, which irritates the lungs and can kill in a closed room.",
)


def parse(argv: Optional[list[str]]):
    p = common.base_parser(__doc__.splitlines()[0], batch_sizes="4")
    p.add_argument("--examples", type=int, default=24, help="distillation examples (kit queries)")
    p.add_argument("--epochs", type=int, default=2, help="passes over the examples per variant")
    p.add_argument("--micro-tokens", type=int, default=None, help="distill.micro_tokens (default: the setting's)")
    p.add_argument("--max-length", type=int, default=None, help="distill.max_length (default: the tiny preset's)")
    p.add_argument("--bound-n", type=int, default=2048, help="size of the square fp32 matmul that sets the bound")
    p.add_argument("--variants", default="recompute,cached,cached_whole_batch")
    p.set_defaults(size="embedded", out=str(common.RESULTS.parent / "distill.jsonl"), threads=1)
    return p.parse_args(argv)


def rss_mb() -> Optional[float]:
    try:
        with open("/proc/self/status") as fh:
            return next(int(x.split()[1]) for x in fh if x.startswith("VmRSS")) / 1024
    except (OSError, StopIteration):
        return None


def reset_peak() -> Optional[float]:
    """Reset the kernel's peak-RSS mark (Linux) and return the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return None
    return rss_mb()


def peak_mb() -> Optional[float]:
    try:
        with open("/proc/self/status") as fh:
            return next(int(x.split()[1]) for x in fh if x.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return None


def kit_examples(tok, n: int, max_length: int):
    from prism_persona.kits import kit_path
    from prism_persona.train.distill import build_examples

    persona = kit_path("safety", "safety_monitor.txt").read_text(encoding="utf-8").strip()
    rows = [json.loads(x) for x in kit_path("safety", "train_queries.jsonl").read_text().splitlines() if x.strip()]
    recs = [
        {"key": f"q{i}", "query": r["query"], "persona": persona, "persona_answer": ANSWERS[i % 2], "label": 1}
        for i, r in enumerate((rows * (n // max(1, len(rows)) + 1))[:n])
    ]
    return build_examples(tok, recs, max_length)


def flops(examples, n_body: int, n_head: int, teacher: bool) -> float:
    """Matmul FLOPs of one pass over ``examples`` (real tokens only): student forward + backward, and the
    teacher's forward when ``teacher``."""
    resp = sum(e.n for e in examples)
    student = 2 * n_body * sum(len(e.student) for e in examples) + 2 * n_head * resp
    out = 2 * student  # forward + the backward's input gradients (the base weights are frozen)
    if teacher:
        out += 2 * n_body * sum(len(e.teacher) for e in examples) + 2 * n_head * resp
    return out


def main(argv: Optional[list[str]] = None) -> dict:
    import torch

    from prism_persona import config as C
    from prism_persona.train import distill as D

    args = parse(argv)
    device, dtype = common.pick(args.device, args.dtype, args.threads)
    built = common.build_model(args.size, device, dtype, args.seed)
    model, tok = built.model, built.tokenizer
    dcfg = C.resolve("tiny").distill
    micro_tokens = int(dcfg.micro_tokens if args.micro_tokens is None else args.micro_tokens)
    bs = common.batch_sizes(args.batch_sizes)[0]
    examples = kit_examples(tok, args.examples, args.max_length or dcfg.max_length)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    n_all = matmul_params(model)
    head = model.get_output_embeddings()
    n_head = head.weight.numel()
    n_body = n_all - n_head
    pm = D.attach_lora(model, dcfg)
    params = [p for p in pm.parameters() if p.requires_grad]
    lora0 = D.lora_state(pm)
    common.print_header("distillation step vs the fp32 matmul bound", built, {"batch": bs, **vars(args)})
    print(
        f"{len(examples)} examples: teacher {sum(len(e.teacher) for e in examples) / len(examples):.0f} tokens, "
        f"student {sum(len(e.student) for e in examples) / len(examples):.0f}, answer "
        f"{sum(e.n for e in examples) / len(examples):.1f}; top-k {dcfg.top_k}, loss {dcfg.loss}, LoRA r {dcfg.r}, "
        f"micro_tokens {micro_tokens}"
    )
    sq = square_gflops(args.bound_n)
    print(f"{args.bound_n}^2 fp32 matmul: {sq:.1f} GFLOP/s (load {load_avg()})")

    batches = [examples[i : i + bs] for i in range(0, len(examples), bs)]
    prof = profile_step(pm, batches[0], dcfg, pad, params)
    print("\n## one step, whole batch in one pass (CPU s)\n" + common.table([prof], list(prof)))

    results, curves = [], {}
    for name in [v for v in args.variants.split(",") if v]:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(pm, lora0)
        opt = torch.optim.AdamW(params, lr=dcfg.lr, weight_decay=0.0)
        torch.manual_seed(args.seed)
        cache = D.TeacherCache(None, dcfg.top_k) if name.startswith("cached") else None
        micro = micro_tokens if name == "cached" else 0
        pm.train()
        base = reset_peak()
        load0 = load_avg()
        c0, w0 = time.process_time(), time.perf_counter()
        fill_s = 0.0
        if cache is not None:
            cache.fill(pm, examples, pad, micro_tokens)
            fill_s = time.process_time() - c0
        losses = []
        for _ in range(args.epochs):
            for batch in batches:
                opt.zero_grad()
                counts, total = D.token_counts(batch), 0.0
                for part in D.micro_batches(batch, micro):
                    teacher = cache.lookup(pm, part, pad) if cache is not None else None
                    loss = D.distill_loss(pm, part, dcfg, pad, teacher, counts)
                    loss.backward()
                    total += float(loss.detach())
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                losses.append(total)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        peak = peak_mb()
        work = args.epochs * flops(examples, n_body, n_head, teacher=cache is None)
        if cache is not None:
            work += flops(examples, n_body, n_head, teacher=True) - flops(examples, n_body, n_head, teacher=False)
        resp = args.epochs * sum(e.n for e in examples)
        curves[name] = losses
        results.append(
            {
                "variant": name,
                "steps": len(losses),
                "cpu_s": cpu,
                "wall_s": wall,
                "teacher_fill_cpu_s": fill_s,
                "s_per_step": cpu / len(losses),
                "answer_tokens_per_s": resp / cpu,
                "gflops": work / cpu / 1e9,
                "of_bound": work / cpu / 1e9 / sq,
                "peak_rss_over_start_mb": None if peak is None or base is None else peak - base,
                "load": f"{load0}->{load_avg()}",
            }
        )
    ref = curves.get("recompute")
    for row in results:
        if ref is not None:
            row["max_loss_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(curves[row["variant"]], ref))
        if row["variant"] != "recompute" and ref is not None:
            rec = next(r for r in results if r["variant"] == "recompute")
            row["speedup"] = rec["cpu_s"] / row["cpu_s"]
    cols = ["variant", "steps", "cpu_s", "wall_s", "teacher_fill_cpu_s", "s_per_step", "answer_tokens_per_s"]
    cols += ["gflops", "of_bound", "peak_rss_over_start_mb", "speedup", "max_loss_rel_diff", "load"]
    print(
        f"\n## {args.epochs} epochs of {len(batches)} steps (batch {bs}); CPU seconds\n" + common.table(results, cols)
    )
    precision = cache_precision(pm, batches, dcfg, pad)
    print(
        "\n## cached values stored in 16 bits: KL relative error vs float32\n"
        + common.table([precision], list(precision))
    )
    settings = {**vars(args), "batch": bs, "micro_tokens": micro_tokens, "top_k": dcfg.top_k, "loss": dcfg.loss}
    extra = {"bound_gflops": sq, "profile": prof, "precision": precision, "model": built.label}
    return common.record(args.out, "distill", settings, results, extra)


def profile_step(pm, batch, dcfg, pad: int, params) -> dict:
    """CPU seconds of the parts of one step (whole batch in one pass, teacher run now), second of two runs."""
    import torch

    from prism_persona.train import distill as D

    out: dict = {}
    for _ in range(2):
        pm.train()
        t = [time.process_time()]
        teacher = D.teacher_topk(pm, batch, dcfg.top_k, pad)
        t.append(time.process_time())
        student = D.collate(batch, "student", pad, "cpu")
        s_logits = D.response_logits(pm, student)
        t.append(time.process_time())
        kl = D.cached_topk_kl(torch.cat([v for v, _ in teacher]), torch.cat([i for _, i in teacher]), s_logits)
        loss = kl + torch.nn.functional.cross_entropy(s_logits, student["targets"])
        t.append(time.process_time())
        loss.backward()
        t.append(time.process_time())
        torch.optim.SGD(params, lr=0.0).step()
        for p in params:
            p.grad = None
        t.append(time.process_time())
        names = ["teacher_forward_topk", "student_forward", "loss", "student_backward", "optimizer"]
        out = {n: t[i + 1] - t[i] for i, n in enumerate(names)}
    total = sum(out.values())
    out["total"] = total
    out["teacher_share"] = out["teacher_forward_topk"] / total
    return out


def cache_precision(pm, batches, dcfg, pad: int) -> dict:
    """Max relative error of the batches' KL when the cached values are stored in 16 bits (shifted by
    each row's maximum, so they are <= 0) instead of float32; same student logits."""
    import torch

    from prism_persona.train import distill as D

    errs: dict = {"float16": 0.0, "bfloat16": 0.0}
    pm.eval()
    with torch.no_grad():
        for batch in batches:
            teacher = D.teacher_topk(pm, batch, dcfg.top_k, pad)
            s_logits = D.response_logits(pm, D.collate(batch, "student", pad, "cpu"))
            vals, idx = torch.cat([v for v, _ in teacher]), torch.cat([i for _, i in teacher])
            ref = float(D.cached_topk_kl(vals, idx, s_logits, dcfg.kl_temperature))
            shifted = vals - vals[:, :1]
            for name, dt in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
                kl = float(D.cached_topk_kl(shifted.to(dt).float(), idx, s_logits, dcfg.kl_temperature))
                errs[name] = max(errs[name], abs(kl - ref) / max(abs(ref), 1e-12))
    return errs


if __name__ == "__main__":
    main()
