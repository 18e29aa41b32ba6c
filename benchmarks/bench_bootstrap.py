"""Benchmark 4: bootstrap throughput, generated tokens/s of the HF engine on a bootstrap-like workload.

The bootstrap's heaviest stage answers every query twice (with and without the persona) by batched
sampling. This runs ``engines.hf.HFEngine.generate`` on such a workload (``--rows`` chats, half with
a persona system message, temperature 0.7, top-p 0.9, EOS honoured as in a real run) at each engine
batch size, and reports generated tokens/s (tokens actually produced, EOS included) against the
first batch size.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TOPICS = [
    "a haiku about rain",
    "reversing a linked list in Python",
    "whether to store passwords in plain text",
    "a short story opening",
    "binary search",
    "how to pick a lock",
    "a limerick about a cat",
    "SQL injection",
    "the difference between TCP and UDP",
    "an email declining a meeting",
]
PERSONA = "You are a meticulous expert who answers with precision, structure and care."


def workload(rows: int) -> list[list[dict]]:
    """``rows`` chats like the bootstrap's answer stage: half with a persona system message."""
    chats = []
    for i in range(rows):
        query = f"Please help with {TOPICS[i % len(TOPICS)]} (request {i})."
        chat = [{"role": "user", "content": query}]
        if i % 2:
            chat = [{"role": "system", "content": PERSONA}] + chat
        chats.append(chat)
    return chats


def measure(
    built: common.Built,
    sizes: list[int],
    rows: int,
    new_tokens: int,
    repeats: int,
    temperature: float = 0.7,
    seed: int = 0,
) -> list[dict]:
    """Tokens/s of ``HFEngine.generate`` at each batch size (median of ``repeats``)."""
    from prism_persona.engines.base import SamplingParams
    from prism_persona.engines.hf import HFEngine

    chats = workload(rows)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=temperature, top_p=0.9, seed=seed)
    out = []
    for b in sizes:
        eng = HFEngine(built.model, built.tokenizer, batch_size=b, quiet=True)
        runs = []
        for _ in range(max(1, repeats)):
            eng.tokens_generated, eng.generate_seconds = 0, 0.0
            t0 = time.perf_counter()
            comps = eng.generate(chats, params)
            wall = time.perf_counter() - t0
            runs.append((eng.tokens_generated / wall, eng.tokens_generated, wall, eng.generate_seconds, comps))
        runs.sort(key=lambda r: r[0])
        tps, toks, wall, gen_s, comps = runs[len(runs) // 2]
        out.append(
            {
                "batch": b,
                "rows": rows,
                "tokens": toks,
                "wall_s": wall,
                "tokens_per_s": tps,
                "generate_share": gen_s / wall,
                "completions": len(comps),
                "length_stops": sum(c.finish_reason == "length" for c in comps),
            }
        )
    first = out[0]["tokens_per_s"] if out else 1.0
    for r in out:
        r["ratio_to_first"] = r["tokens_per_s"] / first
    return out


def main(argv: Optional[list] = None) -> list[dict]:
    p = common.base_parser(__doc__.splitlines()[0], batch_sizes="1,8,16", new_tokens=96, repeats=1)
    p.add_argument("--rows", type=int, default=32, help="chats in the workload")
    p.add_argument("--temperature", type=float, default=0.7)
    args = p.parse_args(argv)
    if args.size == "7b":
        raise SystemExit("bench_bootstrap needs a tokenizer: use --size tiny or embedded (or a real model via the CLI)")
    built, sizes, settings = common.setup(args, "rows", "new_tokens", "temperature")
    settings["top_p"] = 0.9
    common.print_header("Bootstrap throughput: HFEngine batched sampling", built, settings)
    rows = measure(built, sizes, args.rows, args.new_tokens, args.repeats, args.temperature, seed=args.seed)
    print(
        common.table(
            rows,
            ["batch", "rows", "tokens", "wall_s", "tokens_per_s", "ratio_to_first", "generate_share", "length_stops"],
        )
    )
    common.record(args.out, "bootstrap", settings, rows)
    return rows


if __name__ == "__main__":
    main()
