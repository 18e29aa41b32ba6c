"""Query-writing prompt formats on a real model: how many usable, on-domain user requests each
format yields per domain and round.

    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/query_prompt_study.py WORKDIR [FORMAT,...]

Setups: model-written expert personas for the README main command's domains (writing, coding,
safety; 12 queries requested per domain, the tiny preset) and the style persona file
``src/prism_persona/kits/style/pirate.txt`` on stories and cooking (25 requested per domain). Each format runs at
most two rounds; a round asks only for what is still missing. Every kept and dropped line goes to
``WORKDIR/<format>.jsonl`` (with the drop reason) so a sample can be labelled by hand; the counts go
to ``WORKDIR/results.json`` and are printed as a table.

Formats:

* ``list``      -- the library's current prompt: one request per domain for a list of 12, 400 tokens.
* ``examples``  -- a list of 5 per request, one per line, with three format example lines about an
  unrelated topic (gardening), 160 tokens, stop at a blank line.
* ``single``    -- several short requests in one batch: each chat asks for ONE request (persona as
  the system message), 60 tokens, stop at the first line break.
* ``voice``     -- ``single`` in the user's voice: the persona is quoted in the user message as the
  assistant the request is sent to; it sets the topic, the text is a user's message.
* ``opener``    -- ``voice`` with the reply started by a request opener ("How do I", "Can you",
  "Write", ...), rotated over the chats, so that every reply is a request and the starts vary.
* ``topic``     -- ``opener`` without the persona: the domain alone sets the topic (what the queries
  stage's default ``one`` format became).

``rescore,FORMAT`` re-applies the library's filter to a format's stored lines; ``stage`` runs the
library's queries stage itself (format ``one``, two rounds) on the style setup.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

from prism_persona import config as C
from prism_persona.bootstrap.common import Lazy, derive_seed
from prism_persona.bootstrap.personas import join_prefill, load_personas, write_personas
from prism_persona.bootstrap.prompts import QUERY_PROMPT, REQUEST_OPENERS, REQUEST_PROMPT
from prism_persona.bootstrap.queries import QueryFilter
from prism_persona.engines.base import SamplingParams
from prism_persona.engines.hf import HFEngine
from prism_persona.models import with_persona
from prism_persona.store import RunDir

EXPERT = {"writing": 12, "coding": 12, "safety": 12}
STYLE = {"stories": 25, "cooking": 25}
PIRATE = Path(__file__).resolve().parents[1] / "src" / "prism_persona" / "kits" / "style" / "pirate.txt"
ROUNDS = int(os.environ.get("STUDY_ROUNDS", "2"))

EXAMPLES = (
    "How often should I water tomato plants in a hot summer?",
    "Can you suggest a few shade plants for a small north-facing balcony?",
    "Why are the leaves of my basil turning yellow?",
)
VOICE_PROMPT = (
    "Here is the description of an AI assistant:\n\n{persona}\n\n"
    "Write one message that a user might send to this assistant: a question or request about {domain}. "
    "Write it in the user's own words, as the user would type it, not in the assistant's voice. "
    "Reply with the message only, on one line."
)
SINGLE_PROMPT = (
    "Write one realistic question or request that a user might send to you about {domain}, the way an "
    "ordinary user would type it. Reply with the question only, on one line."
)
EXAMPLES_PROMPT = (
    "Write {n} different questions or requests that users might send to an assistant about {domain}, "
    "one per line, in the user's own words. Example lines about gardening:\n{examples}\n\n"
    "Now write {n} lines about {domain}, with no numbering and no other text."
)

QCFG = C.resolve("tiny").queries
"""The filter settings of the tiny preset (min/max characters, requests only)."""


def keep_lines(fmt: str, rows: list, personas: dict, targets: dict) -> tuple[dict, dict]:
    """Run the library's query filter over ``rows`` (``domain, line``) in order; return the kept
    queries and the drop counts per domain (lines beyond the target count as ``surplus``). The
    ``examples`` format's example lines count as already kept, so a copied example is a duplicate."""
    seed = EXAMPLES if fmt == "examples" else ()
    filters = {d: QueryFilter(QCFG, personas[d], seed) for d in targets}
    kept: dict = {d: [] for d in targets}
    surplus: dict = {d: 0 for d in targets}
    for r in rows:
        q = filters[r["domain"]].add(r["line"])
        r["kept"] = bool(q)
        if q and len(kept[r["domain"]]) < targets[r["domain"]]:
            kept[r["domain"]].append(q)
        elif q:
            surplus[r["domain"]] += 1
    drops = {d: {**filters[d].dropped, "surplus": surplus[d]} for d in targets}
    return kept, drops


def chats_for(fmt: str, domain: str, persona: str, missing: int, round_: int) -> tuple[list, list, SamplingParams]:
    """(chats, prefills, params) of one domain's requests in one round."""
    if fmt == "list":
        n_req = math.ceil(missing / 12)
        chats = [with_persona([{"role": "user", "content": QUERY_PROMPT.format(n=12, domain=domain)}], persona)]
        return chats * n_req, [""] * n_req, SamplingParams(max_new_tokens=400, temperature=0.9, top_p=0.95)
    if fmt == "examples":
        n_req = math.ceil(missing / 5)
        text = EXAMPLES_PROMPT.format(n=5, domain=domain, examples="\n".join(EXAMPLES))
        chats = [with_persona([{"role": "user", "content": text}], persona)]
        params = SamplingParams(max_new_tokens=160, temperature=0.9, top_p=0.95, stop=("\n\n",))
        return chats * n_req, [""] * n_req, params
    n_req = math.ceil(missing * 1.3) + 1
    params = SamplingParams(max_new_tokens=40, temperature=1.0, top_p=0.95, stop=("\n",))
    if fmt == "single":
        chat = with_persona([{"role": "user", "content": SINGLE_PROMPT.format(domain=domain)}], persona)
        return [chat] * n_req, [""] * n_req, params
    user = {"role": "user", "content": VOICE_PROMPT.format(persona=persona, domain=domain)}
    if fmt == "voice":
        return [[user]] * n_req, [""] * n_req, params
    if fmt == "topic":
        user = {"role": "user", "content": REQUEST_PROMPT.format(writer="a user", domain=domain)}
    if fmt in ("opener", "topic"):
        prefills = [REQUEST_OPENERS[(i + 5 * round_) % len(REQUEST_OPENERS)] for i in range(n_req)]
        return [[user, {"role": "assistant", "content": p}] for p in prefills], prefills, params
    raise SystemExit(f"unknown format {fmt}")


def run_format(engine, fmt: str, personas: dict, targets: dict, out_dir: Path) -> dict:
    rows: list = []
    res: dict = {d: {"requested": t, "rounds": []} for d, t in targets.items()}
    for round_ in range(ROUNDS):
        kept, _ = keep_lines(fmt, rows, personas, targets)
        todo = [d for d, t in targets.items() if len(kept[d]) < t]
        if not todo:
            break
        plan = []  # (domain, chat, prefill)
        params = None
        for d in todo:
            chats, prefills, params = chats_for(fmt, d, personas[d], targets[d] - len(kept[d]), round_)
            plan += [(d, c, p) for c, p in zip(chats, prefills)]
        params = SamplingParams(**{**params.__dict__, "seed": derive_seed(0, "study", fmt, round_)})
        t0 = time.perf_counter()
        outs = engine.generate([c for _, c, _ in plan], params)
        secs = time.perf_counter() - t0
        for (d, _, prefill), o in zip(plan, outs):
            text = join_prefill(prefill, o.text) if prefill else o.text
            rows += [{"format": fmt, "domain": d, "round": round_, "line": line} for line in text.splitlines() or [""]]
        kept, drops = keep_lines(fmt, rows, personas, targets)
        for d in todo:
            n_chats = sum(1 for x in plan if x[0] == d)
            res[d]["rounds"].append({"chats": n_chats, "usable_total": len(kept[d]), "drops": drops[d]})
        res.setdefault("_seconds", []).append(round(secs, 1))
        res.setdefault("_tokens", []).append(sum(o.num_tokens for o in outs))
        print(f"{fmt} round {round_ + 1}: {len(plan)} chats, {secs:.0f} s, usable", {d: len(kept[d]) for d in todo})
    (out_dir / f"{fmt}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return res


def expert_personas(get_engine, work: Path) -> dict:
    cfg = C.resolve("tiny", overrides={"persona": {"domains": list(EXPERT)}, "quiet": True})
    run = RunDir(work / "personas")
    write_personas(cfg, run, get_engine)
    loaded = load_personas(run)
    return {d: loaded[d]["short"] for d in EXPERT}


def rescore(work: Path, fmt: str, personas: dict, targets: dict) -> dict:
    """Apply the current filter to the lines a format's earlier run wrote (no generation); the kept
    queries go to ``WORKDIR/<format>.kept.json`` (what was hand-labelled)."""
    rows = [json.loads(x) for x in (work / f"{fmt}.jsonl").read_text(encoding="utf-8").splitlines()]
    kept, drops = keep_lines(fmt, rows, personas, targets)
    (work / f"{fmt}.kept.json").write_text(json.dumps(kept, indent=1), encoding="utf-8")
    return {d: {"usable": len(kept[d]), "requested": targets[d], "drops": drops[d]} for d in targets}


def main(work: str, formats: list) -> None:
    logging.basicConfig(level=logging.WARNING)
    out = Path(work)
    out.mkdir(parents=True, exist_ok=True)
    engine = Lazy(lambda: HFEngine.load("smollm2-135m-instruct", "float32", "cpu", batch_size=32, quiet=True))
    personas = expert_personas(engine, out)
    pirate = PIRATE.read_text(encoding="utf-8").strip()
    personas.update({d: pirate for d in STYLE})
    if formats[0] == "stage":
        print(json.dumps(run_stage(engine, out / "stage", pirate), indent=1))
        return
    if formats[0] == "rescore":
        for fmt in formats[1:]:
            print(fmt, json.dumps(rescore(out, fmt, personas, {**EXPERT, **STYLE}), indent=1))
        return
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for fmt in formats:
        results[fmt] = run_format(engine(), fmt, personas, {**EXPERT, **STYLE}, out)
        results_path.write_text(json.dumps(results, indent=1), encoding="utf-8")
        print_format(fmt, results[fmt])


def run_stage(get_engine, out: Path, persona: str) -> dict:
    """The library's queries stage on the style setup (25 per domain, at most two rounds): per domain
    the lines written, the usable queries and the drops, from ``query_rounds.jsonl``."""
    from prism_persona.bootstrap.queries import query_stats, write_queries

    cfg = C.resolve(
        "tiny",
        overrides={
            "out": str(out),
            "quiet": True,
            "persona": {"domains": list(STYLE)},
            "queries": {"queries_per_persona": 25, "max_rounds": 2},
        },
    )
    t0 = time.perf_counter()
    got = write_queries(cfg, RunDir(cfg.out), get_engine, {d: {"short": persona} for d in STYLE})
    return {"seconds": round(time.perf_counter() - t0), **query_stats(cfg, RunDir(cfg.out), got)}


def print_format(fmt: str, res: dict) -> None:
    print(f"\n== {fmt}: seconds per round {res.get('_seconds')}, tokens {res.get('_tokens')}")
    for d, r in res.items():
        if d.startswith("_"):
            continue
        per_round = " ".join(
            f"r{i + 1}:{x['usable_total']}/{r['requested']} ({x['chats']} chats)" for i, x in enumerate(r["rounds"])
        )
        drops: dict = {}
        for x in r["rounds"]:
            for k, v in x["drops"].items():
                drops[k] = drops.get(k, 0) + v
        print(f"  {d:8s} {per_round}  drops {drops}")


if __name__ == "__main__":
    main(sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "list,examples,single,voice,opener").split(","))
