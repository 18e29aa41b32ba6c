"""On-domain share of the query formats on a real model (issue 32, item 3).

    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/query_study.py WORKDIR FORMAT [N] [DOMAINS]

Runs the library's queries stage (:func:`prism_persona.bootstrap.queries.write_queries`, tiny preset,
seed 0) with ``queries.format=FORMAT`` for N queries per domain (default 16; at most two rounds) on
the README's domains (writing, coding, safety) and three others (cooking, medicine, history), no
persona (the queries formats 'one' and 'shots' do not show the persona; it only feeds the filter's
persona-voice check). The run directory is ``WORKDIR/FORMAT``; the kept queries are written to
``WORKDIR/FORMAT.jsonl`` (domain, format, query) for hand labelling, the time and the round records
to ``WORKDIR/FORMAT.rounds.json``. The labels (docs/examples/query_labels/*.jsonl) add ``on_domain``
and ``self_contained``; ``python scripts/query_study.py --table`` prints the table of docs/bootstrap.md
from them; ``python scripts/query_study.py --topic-check FORMAT`` runs the topic check
(``queries.topic_check``) on a format's labelled queries and says how many good ones it keeps.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

DOMAINS = ["writing", "coding", "safety", "cooking", "medicine", "history"]
LABELS = Path(__file__).resolve().parents[1] / "docs" / "examples" / "query_labels"


def run(work: str, fmt: str, n: int, domains: list) -> None:
    from prism_persona import config as C
    from prism_persona.bootstrap.queries import selected_queries, write_queries
    from prism_persona.engines.hf import HFEngine
    from prism_persona.store import RunDir

    cfg = C.resolve(
        "tiny",
        overrides={
            "out": str(Path(work) / fmt),
            "quiet": True,
            "seed": 0,
            "persona": {"domains": domains},
            "queries": {"format": fmt, "queries_per_persona": n, "max_rounds": 2},
        },
    )
    engine = HFEngine.load("smollm2-135m-instruct", "float32", "cpu", batch_size=32, quiet=True)
    t0 = time.time()
    got = write_queries(cfg, RunDir(cfg.out), lambda: engine, {d: {cfg.persona.use_length: ""} for d in domains})
    seconds = time.time() - t0
    rows = [{"query": r["query"], "domain": r["domain"], "format": fmt} for r in selected_queries(cfg, RunDir(cfg.out))]
    Path(work, f"{fmt}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rounds = [json.loads(x) for x in Path(cfg.out, "query_rounds.jsonl").read_text().splitlines()]
    Path(work, f"{fmt}.rounds.json").write_text(json.dumps({"seconds": seconds, "collected": got, "rounds": rounds}))
    print(f"{fmt}: {got} in {seconds:.0f} s")


def topic_check(fmt: str) -> None:
    """The topic check (``queries.topic_check``) on a format's labelled queries: of those it keeps, how
    many are on their domain and self-contained (the check is run after the fact on the same lines)."""
    from prism_persona.bootstrap.queries import on_topic
    from prism_persona.engines.hf import HFEngine

    rows = [json.loads(x) for x in (LABELS / f"{fmt}.jsonl").read_text().splitlines()]
    engine = HFEngine.load("smollm2-135m-instruct", "float32", "cpu", batch_size=32, quiet=True)
    keep = on_topic(engine, [(r["domain"], r["query"]) for r in rows])
    good = [r["on_domain"] and r["self_contained"] for r in rows]
    kept = [g for g, k in zip(good, keep) if k]
    print(
        f"{fmt}: topic check keeps {len(kept)} / {len(rows)}; good among kept {sum(kept)} / {len(kept)}; "
        f"good dropped {sum(good) - sum(kept)} of {sum(good)}"
    )


def table() -> None:
    """Per format and domain: labelled queries, on-domain, self-contained, both (from the label files)."""
    counts: dict = defaultdict(lambda: [0, 0, 0, 0])
    for path in sorted(LABELS.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            for key in ((r["format"], r["domain"]), (r["format"], "all")):
                c = counts[key]
                c[0] += 1
                c[1] += r["on_domain"]
                c[2] += r["self_contained"]
                c[3] += r["on_domain"] and r["self_contained"]
    print("| format | domain | labelled | on-domain | self-contained | both |")
    print("|---|---|---|---|---|---|")
    for (fmt, dom), (n, on, sc, both) in sorted(counts.items()):
        print(f"| {fmt} | {dom} | {n} | {on} | {sc} | {both} ({100 * both / n:.0f} %) |")


if __name__ == "__main__":
    if sys.argv[1:] == ["--table"]:
        table()
    elif sys.argv[1] == "--topic-check":
        topic_check(sys.argv[2])
    else:
        work, fmt = sys.argv[1], sys.argv[2]
        n = int(sys.argv[3]) if len(sys.argv) > 3 else 16
        doms = sys.argv[4].split(",") if len(sys.argv) > 4 else DOMAINS
        Path(work).mkdir(parents=True, exist_ok=True)
        run(work, fmt, n, doms)
