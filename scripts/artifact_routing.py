"""Route-only measurement of PRISM artifacts: the share of MT-Bench first turns, MMLU questions and
labelled query sets (JSON Lines with ``query`` and optional ``domain`` / ``intent``) that each artifact's
gate routes or abstains on. Layer-0 features only, no generation: the same decisions `prism eval` reads
with ``--answer-tokens 1`` (docs/evaluation.md), in seconds instead of minutes.

    PYTHONPATH=src python scripts/artifact_routing.py RUN1/prism RUN2/prism [--set NAME=FILE.jsonl] \
        [--out routing.json]

MMLU: every distinct question of the MMLU fixtures in tests/fixtures (prompted as `prism eval` does) and
the 10 of tests/fixtures/mmlu_original alone (what docs/evaluation.md measured); MT-Bench: the 80 first
turns of ../shared/benchmarks/mt_bench_questions.jsonl, per category too.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ood_study import MTBENCH, ROOT, jsonl, mmlu_queries  # noqa: E402

from prism_persona.config import ModelConfig  # noqa: E402
from prism_persona.evals.benchmarks.mmlu import load_mmlu, mmlu_prompt  # noqa: E402
from prism_persona.gated.artifact import Artifact  # noqa: E402
from prism_persona.gated.features import query_features  # noqa: E402
from prism_persona.models import load_model  # noqa: E402


def mtbench_rows() -> list[dict]:
    for rel in MTBENCH:
        p = Path(rel) if rel.startswith("/") else ROOT / rel
        if p.is_file():
            return [{"query": r["turns"][0], "group": r.get("category", "")} for r in jsonl(p)]
    raise SystemExit("no MT-Bench questions found (../shared/benchmarks/mt_bench_questions.jsonl)")


def labelled_rows(path: Path) -> list[dict]:
    out = []
    for r in jsonl(path):
        group = "/".join(str(r[k]) for k in ("domain", "intent") if r.get(k) not in (None, ""))
        out.append({"query": r["query"], "group": group})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=FILE", help="a labelled .jsonl set")
    ap.add_argument("--out", default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    sets: dict[str, list[dict]] = {
        "mtbench": mtbench_rows(),
        "mmlu_fixtures": [{"query": q, "group": ""} for q in mmlu_queries()],
        "mmlu_original": [
            {"query": mmlu_prompt(it), "group": ""} for it in load_mmlu(ROOT / "tests/fixtures/mmlu_original")
        ],
    }
    for spec in args.set:
        name, _, path = spec.partition("=")
        sets[name] = labelled_rows(Path(path))
    model, tok = load_model(ModelConfig().model, dtype="float32", device="cpu")
    results: dict = {}
    feats: dict = {}
    for art in args.artifacts:
        bundle = Artifact.read(Path(art)).gate()
        pooling = bundle.gate.pooling
        out: dict = {"contrast": bundle.gate.ood_contrast is not None}
        for name, rows in sets.items():
            key = (name, pooling)
            if key not in feats:
                feats[key] = query_features(model, tok, [r["query"] for r in rows], args.batch_size, pooling)
            with torch.no_grad():
                d = bundle.decide(feats[key])
            groups: dict = defaultdict(list)
            for r, routed in zip(rows, d.routed.tolist()):
                groups[r["group"]].append(routed)
            out[name] = {
                "n": len(rows),
                "routed": float(d.routed.float().mean()),
                "abstained": float(d.abstained.float().mean()),
                "wanted": float((d.probs >= bundle.threshold).float().mean()),
                "by_group": {g: sum(v) / len(v) for g, v in sorted(groups.items())} if len(groups) > 1 else {},
            }
        results[art] = out
        cells = " ".join(f"{k}={v['routed']:.1%}" for k, v in out.items() if isinstance(v, dict))
        print(f"{art}: {cells}")
        for k, v in out.items():
            if isinstance(v, dict) and v["by_group"]:
                print("   ", k, " ".join(f"{g}={x:.0%}" for g, x in v["by_group"].items()))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
