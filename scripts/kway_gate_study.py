"""Issue 29: one K-way gate for both example kits' personas, against each kit's binary gate.

Layer-0 features only (no generation); labels are the kits' true ones (no judge): a style-kit story
request is the storyteller's (style kit persona), a safety-kit harmful request the monitor's, every other
query the base model's. The gates are the project's (:func:`prism_persona.train.gate.train_gate_on_records`,
GateConfig defaults: temperature scaling, ``min_confidence = auto``, the abstain region) trained on the kits'
training queries; measured on the kits' held-out files (never trained on), MMLU (the fixtures) and MT-Bench
first turns: confusion matrix, routing per class, abstain rate, expected calibration error (10 bins, top
label) before (T = 1) and after the fitted temperature.

    PYTHONPATH=src python scripts/kway_gate_study.py --out docs/kway_gate_study.json [--model SPEC]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ood_study import KITS, ROOT, jsonl, mmlu_queries, mtbench_queries  # noqa: E402

from prism_persona.config import GateConfig, ModelConfig  # noqa: E402
from prism_persona.gated.features import query_features  # noqa: E402
from prism_persona.gated.gate import decide  # noqa: E402
from prism_persona.models import load_model  # noqa: E402
from prism_persona.train.gate import expected_calibration_error, top_label, train_gate_on_records  # noqa: E402

PERSONA = {"style": "storyteller", "safety": "monitor"}
KWAY = replace(GateConfig(), classes="personas")
"""GateConfig defaults with one class per persona (``gate.classes`` defaults to ``binary``: without it the
K-way rows below were a binary gate, whose one persona index read as the storyteller)."""


def measure(bundle, feats: torch.Tensor, classes: list[int] | None, persona_of: dict) -> dict:
    """Routing, abstain, confusion and ECE of ``bundle`` on ``feats`` (true ``classes`` in the K-way
    numbering: 0 base, 1 storyteller, 2 monitor; ``persona_of`` maps the bundle's persona index to it)."""
    with torch.no_grad():
        d = decide(bundle.gate, bundle.threshold, feats)
        raw = torch.softmax(bundle.gate.class_logits(feats, temperature=1.0), -1)
    decided = [0 if p < 0 else persona_of[p] for p in d.persona.tolist()]
    out = {
        "n": len(decided),
        "routed": float(d.routed.float().mean()),
        "abstained": float(d.abstained.float().mean()),
    }
    if classes is None:
        return out
    k = 3
    matrix = [[0] * k for _ in range(k)]
    for t, p in zip(classes, decided):
        matrix[t][p] += 1
    out["confusion"] = matrix
    out["routed_to_own_persona"] = {c: (matrix[c][c] / sum(matrix[c]) if sum(matrix[c]) else None) for c in (1, 2)}
    out["base_rows_routed"] = (sum(matrix[0][1:]) / sum(matrix[0])) if sum(matrix[0]) else None
    # ECE in the gate's own class numbering (binary gate: a class the gate does not have counts as base)
    inv = {v: i + 1 for i, v in persona_of.items()}
    labels = [inv.get(c, 0) for c in classes]
    for name, probs in (("ece_before", raw), ("ece_after", d.class_probs)):
        conf, ok = top_label(probs, labels)
        out[name] = expected_calibration_error(conf, ok)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/kway_gate_study.json")
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    t0 = time.perf_counter()
    spec = args.model or ModelConfig().model
    model, tok = load_model(spec, dtype="float32", device="cpu")
    pooling = GateConfig().pooling
    rows: dict = {"train": [], "heldout": []}
    for kit, (folder, label) in KITS.items():
        for split, fname in (("train", "train_queries.jsonl"), ("heldout", "heldout.jsonl")):
            for r in jsonl(ROOT / folder / fname):
                won = label(r)
                rows[split].append(
                    {
                        "kit": kit,
                        "query": r["query"],
                        "domain": f"{kit}/{r['domain']}",
                        "label": won,
                        "class": (1 if kit == "style" else 2) if won else 0,
                    }
                )
    feats = {
        s: query_features(model, tok, [r["query"] for r in rs], args.batch_size, pooling) for s, rs in rows.items()
    }
    feats["mmlu"] = query_features(model, tok, mmlu_queries(), args.batch_size, pooling)
    feats["mtbench"] = query_features(model, tok, mtbench_queries(), args.batch_size, pooling)
    for i, r in enumerate(rows["train"]):
        r["key"] = str(i)
    held_classes = [r["class"] for r in rows["heldout"]]
    personas = [
        {"name": PERSONA[kit], "key": kit, "domains": sorted({r["domain"] for r in rows["train"] if r["kit"] == kit})}
        for kit in ("style", "safety")
    ]
    results: dict = {"model": spec, "pooling": pooling, "sizes": {k: int(v.shape[0]) for k, v in feats.items()}}
    systems: dict = {}
    for variant, cfg in (
        ("kway (defaults)", KWAY),
        ("kway, min_confidence off", replace(KWAY, min_confidence="off")),
        ("kway, temperature off", replace(KWAY, temperature="off")),
    ):
        b = train_gate_on_records(feats["train"], rows["train"], cfg, 0, persona_list=personas)
        systems[variant] = {
            "temperature": b.gate.temperature,
            "min_confidence": b.gate.min_confidence,
            "min_confidence_method": b.info.get("min_confidence_method"),
            "threshold": b.threshold,
            "training_split_calibration": {
                k: b.info["calibration"].get(k) for k in ("n", "ece_before", "ece_after", "temperature")
            },
            "heldout_files": measure(b, feats["heldout"], held_classes, {0: 1, 1: 2}),
            "mmlu": measure(b, feats["mmlu"], None, {0: 1, 1: 2}),
            "mtbench": measure(b, feats["mtbench"], None, {0: 1, 1: 2}),
        }
    for kit, cls in (("style", 1), ("safety", 2)):
        idx = [i for i, r in enumerate(rows["train"]) if r["kit"] == kit]
        b = train_gate_on_records(feats["train"][idx], [rows["train"][i] for i in idx], GateConfig(), 0)
        systems[f"binary {kit}"] = {
            "temperature": b.gate.temperature,
            "threshold": b.threshold,
            "training_split_calibration": {
                k: b.info["calibration"].get(k) for k in ("n", "ece_before", "ece_after", "temperature")
            },
            "heldout_files": measure(b, feats["heldout"], held_classes, {0: cls}),
            "mmlu": measure(b, feats["mmlu"], None, {0: cls}),
            "mtbench": measure(b, feats["mtbench"], None, {0: cls}),
        }
    results["systems"] = systems
    results["classes"] = ["base", "storyteller", "monitor"]
    results["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    for name, s in systems.items():
        h = s["heldout_files"]
        print(
            f"{name:28s} T={s['temperature']:.2f} own={h['routed_to_own_persona']} base->routed={h['base_rows_routed']:.3f} "
            f"abstain={h['abstained']:.3f} ECE {h['ece_before']:.3f}->{h['ece_after']:.3f} "
            f"mmlu={s['mmlu']['routed']:.3f} mtbench={s['mtbench']['routed']:.3f} conf={h['confusion']}"
        )


if __name__ == "__main__":
    main()
