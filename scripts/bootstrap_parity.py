"""Do the HF and vLLM engines bootstrap the same thing? The same small bootstrap, greedy (temperature 0
for personas, queries and answers; log-prob verdicts), run with each engine; agreement per stage.

Four run directories under ``--work``:

* ``hf``: every stage on the in-process HF engine;
* ``vllm``: every stage on a vLLM server PRISM starts (or ``--base-url``) -- end to end, so a
  difference in an early stage (a persona) carries into the later ones;
* ``vllm-answers``: ``hf``'s personas and queries, answers and verdicts on vLLM -- the answers stage on
  identical inputs;
* ``vllm-verdicts``: ``hf``'s personas, queries and answers, verdicts on vLLM -- the judge alone.

Printed (and written to ``WORK/parity.json``): per stage the share of equal texts (personas by domain and
length, queries as sets per domain, answers by query, with and without persona; trailing U+FFFD of a
multi-byte character cut by the token budget ignored, see :func:`same_text`) and of equal verdicts (the
winner of both orders, and the training label; "same answers": over the pairs whose two answers are
byte-identical in both runs, i.e. the judge alone). Resumable: a rerun skips what
each run directory already holds.

    python scripts/bootstrap_parity.py --work runs/parity                 # the embedded model
    python scripts/bootstrap_parity.py --model path/to/hf-dir --domains a,b --queries 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

PERSONA_FILES = ("personas.jsonl",)
QUERY_FILES = ("queries.jsonl", "query_rounds.jsonl", "query_rounds.meta.json")
ANSWER_FILES = ("answers.jsonl",)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--work", default="runs/parity", help="directory for the four runs and parity.json")
    p.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--domains", default="writing,coding,safety", help="comma-separated domains")
    p.add_argument("--queries", type=int, default=4, help="queries per persona")
    p.add_argument("--answer-tokens", type=int, default=64, help="max new tokens per answer")
    p.add_argument("--persona-tokens", type=int, default=160, help="max new tokens per persona")
    p.add_argument("--query-tokens", type=int, default=240, help="max new tokens per query-writing request")
    p.add_argument(
        "--queries-file", default="", help="your own queries (.jsonl with domain, query) instead of written ones"
    )
    p.add_argument("--batch-size", type=int, default=8, help="HF engine batch")
    p.add_argument(
        "--vllm-python", default="", help="Python that runs vLLM (default: the venv of scripts/setup_vllm.sh)"
    )
    p.add_argument("--vllm-cores", default="", help="cores vLLM binds to, e.g. 0 or 0-1 (default: vLLM's choice)")
    p.add_argument("--base-url", default="", help="attach to this vLLM server instead of starting one")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the HF engine")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def run_config(args, out: Path, engine: str):
    from prism_persona import config as C

    e = {"engine": engine}
    if engine == "vllm":
        e.update(
            base_url=args.base_url,
            vllm_python=args.vllm_python,
            vllm_cpu_cores=args.vllm_cores,
            vllm_kv_cache_gib=1,
            vllm_max_model_len=2048,
        )
    overrides = {
        "out": str(out),
        "quiet": args.quiet,
        "seed": 0,
        "engine": e,
        "model": {
            "model": args.model or C.EMBEDDED_MODEL,
            "dtype": "float32",
            "device": "cpu",
            "batch_size": args.batch_size,
        },
        "persona": {
            "domains": [d.strip() for d in args.domains.split(",") if d.strip()],
            "lengths": ["short"],
            "use_length": "short",
            "temperature": 0.0,
            "max_new_tokens": args.persona_tokens,
        },
        "queries": {
            "queries_per_persona": args.queries,
            "per_request": args.queries,
            "max_rounds": 2,
            "temperature": 0.0,
            "max_new_tokens": args.query_tokens,
            "queries_file": str(Path(args.queries_file).resolve()) if args.queries_file else "",
        },
        "answers": {"temperature": 0.0, "max_new_tokens": args.answer_tokens},
        "judge": {"judge": "self", "mode": "logprob"},
    }
    return C.resolve(overrides=overrides)


def seed_run(src: Path, dst: Path, files: tuple) -> None:
    """Start ``dst`` from ``src``'s files of the earlier stages (once; a resumed run keeps its own)."""
    dst.mkdir(parents=True, exist_ok=True)
    names = list(files) + [n[: -len(".jsonl")] + ".meta.json" for n in files if n.endswith(".jsonl")]
    for name in names:  # each store with its settings header
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)


def bootstrap(args, out: Path, engine: str) -> float:
    from prism_persona.train.pipeline import run_bootstrap

    t0 = time.perf_counter()
    run_bootstrap(run_config(args, out, engine))
    return round(time.perf_counter() - t0, 1)


# --------------------------------------------------------------------------------------------------
# comparing two run directories


def records(run: Path, name: str) -> list[dict]:
    path = run / name
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line.strip():
            rec = json.loads(line)
            if isinstance(rec, dict) and "key" in rec:
                out.append(rec)
    return out


def same_text(x, y) -> bool:
    """Equal texts, up to trailing U+FFFD: where the token budget cuts a multi-byte character, HF decodes
    the stray bytes to U+FFFD and vLLM's incremental detokeniser holds them back (the same tokens)."""
    norm = lambda t: (t or "").strip().rstrip("\ufffd")  # noqa: E731
    return norm(x) == norm(y)


def rate(equal: int, n: int) -> dict:
    return {"equal": equal, "n": n, "rate": round(equal / n, 4) if n else None}


def compare_personas(a: Path, b: Path) -> dict:
    pa = {(r.get("domain"), r.get("length")): r.get("text") for r in records(a, "personas.jsonl")}
    pb = {(r.get("domain"), r.get("length")): r.get("text") for r in records(b, "personas.jsonl")}
    shared = sorted(set(pa) & set(pb), key=str)
    return rate(sum(same_text(pa[k], pb[k]) for k in shared), len(shared))


def compare_queries(a: Path, b: Path) -> dict:
    """Per domain the query sets; ``rate``: share of all queries (either run) that both runs wrote."""
    qa, qb = {}, {}
    for runs, store in ((a, qa), (b, qb)):
        for r in records(runs, "queries.jsonl"):
            store.setdefault(r.get("domain"), set()).add(r.get("query"))
    domains = set(qa) | set(qb)
    both = sum(len(qa.get(d, set()) & qb.get(d, set())) for d in domains)
    union = sum(len(qa.get(d, set()) | qb.get(d, set())) for d in domains)
    same_sets = sum(qa.get(d) == qb.get(d) for d in domains)
    return {**rate(both, union), "domains_with_equal_sets": same_sets, "domains": len(domains)}


def compare_answers(a: Path, b: Path) -> dict:
    ra = {r["key"]: r for r in records(a, "answers.jsonl")}
    rb = {r["key"]: r for r in records(b, "answers.jsonl")}
    shared = sorted(set(ra) & set(rb))
    out = {"queries_compared": len(shared)}
    for field in ("base_answer", "persona_answer"):
        out[field] = rate(sum(same_text(ra[k][field], rb[k][field]) for k in shared), len(shared))
    return out


def compare_verdicts(a: Path, b: Path) -> dict:
    """Winner (both orders) and training label agreement over the pairs both runs judged; ``same_answers``:
    the same over pairs whose two answers are identical in both runs (the judge alone)."""
    va = {r["key"]: r for r in records(a, "verdicts.jsonl")}
    vb = {r["key"]: r for r in records(b, "verdicts.jsonl")}
    aa = {r["key"]: r for r in records(a, "answers.jsonl")}
    ab = {r["key"]: r for r in records(b, "answers.jsonl")}
    shared = sorted(set(va) & set(vb))
    same = [
        k
        for k in shared
        if k in aa and k in ab and all(aa[k][f] == ab[k][f] for f in ("base_answer", "persona_answer"))
    ]

    def agree(keys, field):
        return rate(sum(_field(va[k], field) == _field(vb[k], field) for k in keys), len(keys))

    return {
        "winner": agree(shared, "winner"),
        "label": agree(shared, "label"),
        "same_answers_winner": agree(same, "winner"),
        "same_answers_label": agree(same, "label"),
    }


def _field(rec: dict, name: str):
    return rec.get(name)


def compare_runs(a: Path, b: Path) -> dict:
    return {
        "personas": compare_personas(a, b),
        "queries": compare_queries(a, b),
        "answers": compare_answers(a, b),
        "verdicts": compare_verdicts(a, b),
    }


def table(results: dict) -> str:
    def cell(r):
        return "-" if not r or r.get("n") in (0, None) else f"{r['rate']:.2f} ({r['equal']}/{r['n']})"

    lines = [
        "| comparison with hf | personas | queries | base answers | persona answers | verdict winner | label "
        "| winner, same answers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, res in results.items():
        lines.append(
            f"| {name} | {cell(res['personas'])} | {cell(res['queries'])} | {cell(res['answers']['base_answer'])} "
            f"| {cell(res['answers']['persona_answer'])} | {cell(res['verdicts']['winner'])} "
            f"| {cell(res['verdicts']['label'])} | {cell(res['verdicts']['same_answers_winner'])} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    import torch

    torch.set_num_threads(max(1, args.threads))
    work = Path(args.work).expanduser().resolve()
    hf, full, answers, verdicts = (work / n for n in ("hf", "vllm", "vllm-answers", "vllm-verdicts"))
    seconds = {"hf": bootstrap(args, hf, "hf")}
    seconds["vllm"] = bootstrap(args, full, "vllm")
    seed_run(hf, answers, PERSONA_FILES + QUERY_FILES)
    seconds["vllm-answers"] = bootstrap(args, answers, "vllm")
    seed_run(hf, verdicts, PERSONA_FILES + QUERY_FILES + ANSWER_FILES)
    seconds["vllm-verdicts"] = bootstrap(args, verdicts, "vllm")
    results = {
        name: compare_runs(hf, run)
        for name, run in (
            ("vllm (end to end)", full),
            ("vllm-answers (hf personas+queries)", answers),
            ("vllm-verdicts (hf answers)", verdicts),
        )
    }
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "model": args.model or "embedded",
        "settings": {k: v for k, v in vars(args).items() if k not in ("quiet",)},
        "seconds": seconds,
        "results": results,
    }
    (work / "parity.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    print(table(results))
    print(f"seconds per run: {seconds}; written to {work / 'parity.json'}")
    return record


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
