"""Benchmark 8: how the cost of `prism run` grows with the work -- wall time and peak RSS per stage.

One grid point = one `prism run` in a child process (the CLI itself, in-process there), with every
stage function wrapped to time it and a sampler thread recording the process RSS (every 20 ms) under
the stage running at that moment. Axes (``--axis``):

- ``queries``  queries per domain (``--values 12,50,200``; 3 domains, user queries from a file so the
               count is exact);
- ``domains``  domains (``--values 3,9``);
- ``tokens``   answer length (``--values 96,256,512``);
- ``model``    model shape (``--values 135m,0.5b,1.5b``): random weights of the real architectures
               (SmolLM2-135M = Llama 30x576; Qwen2.5-0.5B = 24x896; Qwen2.5-1.5B = 28x1536; their real
               vocabularies), built in memory, with the embedded model's tokenizer.

The data axes run on ``--base`` (``tiny``: a random 4-layer Llama, hidden 64 -- the model's cost is
negligible, so what grows is PRISM's own code; or ``embedded``). Settings are the paper's where they
shape the cost (LoRA r=16 on all projections of layers 1..L-1, top-k teacher logits) with short
budgets (``--short``: 16-token personas and answers) so a point takes seconds to minutes. Per stage
the script fits the exponent ``k`` of ``time ~ x^k`` (least squares in log-log) over the axis:
``k`` near 1 is linear, clearly above 1 is super-linear.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

DOMAINS = ["writing", "coding", "safety", "math", "roleplay", "cooking", "travel", "history", "health"]
WORDS = (
    "explain compare improve design debug summarise plan review outline estimate rewrite choose "
    "test measure teach translate organise decide simplify check"
).split()
OBJECTS = (
    "a function a paragraph a budget a recipe an essay a schedule a proof a story a query a diet "
    "a trip a lesson a poem a report a habit a timeline"
).split(" a ")

# Random-weight shapes of the real architectures (their config.json; weights random, nothing downloaded).
SHAPES = {
    "135m": dict(
        arch="llama",
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "0.5b": dict(
        arch="qwen2",
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "1.5b": dict(
        arch="qwen2",
        hidden_size=1536,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        intermediate_size=8960,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
}

STAGE_HOOKS = [  # (module, attribute, stage): the functions `prism run` calls, one per stage
    ("prism_persona.train.pipeline", "load_base", "load_model"),
    ("prism_persona.bootstrap.personas", "step", "personas"),
    ("prism_persona.bootstrap.queries", "step", "queries"),
    ("prism_persona.bootstrap.answers", "step", "answers"),
    ("prism_persona.bootstrap.verify", "step", "verify"),
    ("prism_persona.train.gate", "step", "gate"),
    ("prism_persona.train.distill", "step", "distill"),
    ("prism_persona.gated.artifact", "assemble", "assemble"),
]


# --------------------------------------------------------------------------------------------------
# the child: one `prism run`, timed and sampled per stage


class StageMeter:
    """Seconds and peak RSS per stage; the current stage is set by the wrapped stage functions."""

    def __init__(self, interval: float = 0.02):
        self.stage = "setup"
        self.seconds: dict = {}
        self.cpu_seconds: dict = {}
        self.peak_mb: dict = {}
        self.start_mb: dict = {}
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def rss_mb() -> float:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self.note()

    def note(self) -> None:
        rss = self.rss_mb()
        self.peak_mb[self.stage] = max(self.peak_mb.get(self.stage, 0.0), rss)

    def wrap(self, fn, stage: str):
        def timed(*args, **kwargs):
            outer = self.stage
            self.stage = stage
            self.start_mb.setdefault(stage, self.rss_mb())
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.note()
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0
                self.cpu_seconds[stage] = self.cpu_seconds.get(stage, 0.0) + time.process_time() - c0
                self.stage = outer

        return timed

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def random_model(shape: str, seed: int = 0):
    """A random-weight model of ``shape`` (see SHAPES) in fp32 and the embedded model's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from prism_persona.models import load_tokenizer, prepare_model

    tok = load_tokenizer(prepare_model(None))
    spec = dict(SHAPES[shape])
    arch = spec.pop("arch")
    kw = dict(
        spec,
        max_position_embeddings=8192,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    cfg = Qwen2Config(**kw) if arch == "qwen2" else LlamaConfig(**kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, tok


def child(spec: dict) -> dict:
    """Run ``prism run`` with ``spec["argv"]`` under a StageMeter; with ``spec["shape"]`` the base model
    is a random model of that shape built in memory."""
    import importlib

    from prism_persona import cli

    meter = StageMeter()
    for mod_name, attr, stage in STAGE_HOOKS:
        mod = importlib.import_module(mod_name)
        fn = getattr(mod, attr)  # fails loudly if the pipeline's stage functions moved
        if stage == "load_model" and spec.get("shape"):
            shape = spec["shape"]
            fn = lambda cfg, _shape=shape: random_model(_shape)  # noqa: E731
        setattr(mod, attr, meter.wrap(fn, stage))
    t0 = time.perf_counter()
    with meter:
        rc = cli.main(spec["argv"])
    wall = time.perf_counter() - t0
    import resource

    return {
        "rc": rc,
        "wall_s": wall,
        "seconds": meter.seconds,
        "cpu_seconds": meter.cpu_seconds,
        "peak_rss_mb": meter.peak_mb,
        "start_rss_mb": meter.start_mb,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **distill_work(Path(spec["argv"][spec["argv"].index("--out") + 1])),
    }


def distill_work(run: Path) -> dict:
    """How much the distill stage did (its steps and examples, from ``RUN/distill.done.json``): the
    self-judge decides how many pairs are distilled, so a distill time is only comparable per step."""
    try:
        done = json.loads((run / "distill.done.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {"distill_steps": done.get("steps"), "distill_examples": done.get("examples")}


# --------------------------------------------------------------------------------------------------
# the parent: the grid


def synthetic_queries(domains: list[str], per_domain: int) -> list[dict]:
    """Distinct, realistic-length user queries (so no deduplication removes any)."""
    out = []
    for d in domains:
        for i in range(per_domain):
            verb, obj = WORDS[i % len(WORDS)], OBJECTS[(i // len(WORDS)) % len(OBJECTS)].strip()
            out.append({"domain": d, "query": f"Can you {verb} {obj} for my {d} work? Case {i}: keep it short."})
    return out


def point_argv(base_model: str, out: Path, domains: list[str], qfile: Path, per_domain: int, tokens: int) -> list:
    """`prism run` arguments of one grid point: tiny preset, paper LoRA (r=16 all projections), top-k."""
    return [
        "run",
        "--preset",
        "tiny",
        "--model",
        base_model,
        "--domains",
        ",".join(domains),
        "--queries-file",
        str(qfile),
        "--queries-per-persona",
        str(per_domain),
        "--answer-tokens",
        str(tokens),
        "--out",
        str(out),
        "-q",
        "--set",
        "persona.max_new_tokens=16",
        "--set",
        "distill.r=16",
        "--set",
        "distill.alpha=32",
        "--set",
        "distill.max_length=128",
    ]


def run_point(spec: dict, timeout: float) -> dict:
    """One grid point in a fresh Python (its own RSS), returning the child's record."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(spec, fh)
        path = fh.name
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", path], capture_output=True, text=True, timeout=timeout, check=False
        )
    finally:
        os.unlink(path)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("GROWTH ")]
    if proc.returncode or not lines:
        raise SystemExit(f"grid point failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("GROWTH ") :])


def fit_exponent(xs: list[float], ys: list[float]) -> Optional[float]:
    """Least-squares slope of log(y) on log(x); None with fewer than two usable points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else None


def grid(
    axis: str, values: list[str], base: str, queries: int, domains: int, tokens: int, sets: Sequence[str] = ()
) -> list[dict]:
    """The specs of an axis' points (each spec: argv, shape, x)."""
    specs = []
    tmp = Path(tempfile.mkdtemp(prefix="prism-growth-"))
    model_dir = "smollm2-135m-instruct"
    if base == "tiny" or axis == "model":
        from prism_persona.testing import make_tiny_model

        model_dir = str(make_tiny_model(tmp / "tiny", num_layers=4, hidden_size=64))
    for v in values:
        q, n_dom, t, shape = queries, domains, tokens, None
        if axis == "queries":
            q = int(v)
        elif axis == "domains":
            n_dom = int(v)
        elif axis == "tokens":
            t = int(v)
        elif axis == "model":
            shape = v
        doms = DOMAINS[:n_dom]
        qfile = tmp / f"q-{v}.jsonl"
        qfile.write_text("".join(json.dumps(r) + "\n" for r in synthetic_queries(doms, q)), encoding="utf-8")
        # a random-shape point loads the embedded tokenizer: the CLI gets the embedded model's name
        model = "smollm2-135m-instruct" if shape else model_dir
        argv = point_argv(model, tmp / f"run-{v}", doms, qfile, q, t) + [a for kv in sets for a in ("--set", kv)]
        specs.append({"argv": argv, "shape": shape, "x": v})
    return specs


def x_value(axis: str, v: str) -> float:
    if axis == "model":
        return {"135m": 134.5e6, "0.5b": 494e6, "1.5b": 1.54e9}[v]
    return float(v)


def render(path: Path, png: Optional[Path] = None) -> str:
    """Markdown tables (CPU seconds and peak RSS per stage, fitted exponents) of every growth record in
    ``path`` (the latest record per axis), and a log-log plot of CPU seconds per stage to ``png``."""
    recs = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        rec = json.loads(line) if line.strip() else {}
        if rec.get("bench") == "growth":
            recs[rec["settings"]["axis"]] = rec
    order = [h[2] for h in STAGE_HOOKS]
    parts, series = [], {}
    for axis, rec in recs.items():
        rows = rec["rows"]
        stages = sorted({s for r in rows for s in r["seconds"]}, key=order.index)
        xs = [x_value(axis, r["x"]) for r in rows]
        cols = [f"{axis}={r['x']}" for r in rows]
        table = []
        for s in stages:
            cpu = [(r.get("cpu_seconds") or r["seconds"]).get(s) for r in rows]
            rss = [r["peak_rss_mb"].get(s) for r in rows]
            cells = {c: f"{v:.2f} s / {m:.0f} MB" for c, v, m in zip(cols, cpu, rss) if v is not None and m}
            table.append({"stage": s, **cells, "exponent": fit_exponent(xs, cpu)})
            series[(axis, s)] = (xs, cpu)
        if any(r.get("distill_steps") is not None for r in rows):  # records before this field have none
            work = {
                c: f"{r.get('distill_steps')} steps, {r.get('distill_examples')} examples" for c, r in zip(cols, rows)
            }
            table.append({"stage": "distill work", **work, "exponent": None})
        loads = ", ".join(f"{r['load_before']}->{r['load_after']}" for r in rows)
        code = f"; {rec['code']}" if rec.get("code") else ""
        parts.append(f"**{axis}** ({rec['date']}{code}; settings {rec['settings']}; load {loads})\n")
        parts.append(common.table(table, ["stage", *cols, "exponent"]) + "\n")
    if png and series:
        plot(series, list(recs), png)
    return "\n".join(parts)


def plot(series: dict, axes: list[str], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, subplots = plt.subplots(1, len(axes), figsize=(4.2 * len(axes), 3.6), squeeze=False)
    for ax, axis in zip(subplots[0], axes):
        for (a, stage), (xs, ys) in series.items():
            pts = [(x, y) for x, y in zip(xs, ys) if y and y > 0.05]
            if a == axis and len(pts) > 1:
                ax.loglog(*zip(*pts), marker="o", label=stage)
        ax.set_title(f"CPU seconds per stage vs {axis}")
        ax.set_xlabel(axis)
        ax.grid(True, which="both", alpha=0.3)
    subplots[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv: Optional[list] = None) -> list[dict]:
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--render"]:  # --render RESULTS.jsonl [PLOT.png]
        print(render(Path(argv[1]), Path(argv[2]) if len(argv) > 2 else None))
        return []
    if argv[:1] == ["--child"]:
        with open(argv[1], encoding="utf-8") as fh:
            res = child(json.load(fh))
        print("GROWTH " + json.dumps(res), flush=True)
        return [res]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--axis", choices=["queries", "domains", "tokens", "model"], required=True)
    p.add_argument("--values", required=True, help="comma-separated axis values")
    p.add_argument("--base", choices=["tiny", "embedded"], default="tiny", help="model of the data axes")
    p.add_argument("--queries", type=int, default=12, help="queries per domain when not the axis")
    p.add_argument("--domains", type=int, default=3, help="domains when not the axis")
    p.add_argument("--tokens", type=int, default=16, help="answer tokens when not the axis")
    p.add_argument("--set", action="append", default=[], help="extra `prism run --set KEY=VALUE` (repeatable)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per grid point")
    p.add_argument("--out", default=str(common.RESULTS), help="results file to append to ('' = do not record)")
    args = p.parse_args(argv)
    values = [v.strip() for v in args.values.split(",") if v.strip()]
    rows = []
    for spec in grid(args.axis, values, args.base, args.queries, args.domains, args.tokens, args.set):
        load0 = round(os.getloadavg()[0], 2)
        res = run_point(spec, args.timeout)
        res.update(x=spec["x"], load_before=load0, load_after=round(os.getloadavg()[0], 2))
        rows.append(res)
        stages = " ".join(f"{k}={v:.1f}s/{res['peak_rss_mb'].get(k, 0):.0f}MB" for k, v in res["seconds"].items())
        print(f"{args.axis}={spec['x']}: wall {res['wall_s']:.1f}s  {stages}  (load {load0}->{res['load_after']})")
        sys.stdout.flush()
    stages = sorted({s for r in rows for s in r["seconds"]}, key=[h[2] for h in STAGE_HOOKS].index)
    xs = [x_value(args.axis, r["x"]) for r in rows]

    def cost(r: dict) -> dict:  # CPU seconds of the stage (wall time on a shared machine measures the others)
        return r.get("cpu_seconds") or r["seconds"]

    fits = {s: fit_exponent(xs, [cost(r).get(s) for r in rows]) for s in stages}
    fits["total"] = fit_exponent(xs, [r["wall_s"] for r in rows])
    table = [
        {"stage": s, **{f"{args.axis}={r['x']}": r["seconds"].get(s) for r in rows}, "exponent": fits[s]}
        for s in stages
    ]
    table.append({"stage": "total", **{f"{args.axis}={r['x']}": r["wall_s"] for r in rows}, "exponent": fits["total"]})
    print("CPU seconds per stage and the fitted exponent")
    print(common.table(table, ["stage", *[f"{args.axis}={r['x']}" for r in rows], "exponent"]))
    rss = [{"stage": s, **{f"{args.axis}={r['x']}": r["peak_rss_mb"].get(s) for r in rows}} for s in stages]
    print("peak RSS (MB) per stage")
    print(common.table(rss, ["stage", *[f"{args.axis}={r['x']}" for r in rows]]))
    settings = {
        "axis": args.axis,
        "values": values,
        "base": args.base,
        "queries": args.queries,
        "domains": args.domains,
        "tokens": args.tokens,
        "sets": args.set,
    }
    common.record(args.out, "growth", settings, rows, {"exponents": fits})
    return rows


if __name__ == "__main__":
    main()
