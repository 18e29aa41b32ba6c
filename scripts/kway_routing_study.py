"""Issue 29: why a two-persona run's K-way gate routes the base-class held-out queries, and what fixes it.

Reads a finished ``prism run --example safety+style --set gate.classes=personas`` run directory (a copy:
nothing in it is written): the bootstrap's verdicts (the gate's labels), the gate's settings, the
personas of its gate and the check's held-out queries. Computes the layer-0 features of the training
and held-out queries once (cached in ``--cache``), then

* ``diagnose``: retrains the run's gate from its own labels (checking it matches the saved one) and, for
  every held-out query, the gate's class probabilities, ``1 - P(base)``, the persona confidence floor and
  the abstain region; which component routes the base-class queries;
* ``cv``: each candidate gate setting scored by cross-validation on the run's own labelled rows only
  (the bootstrap's verdicts; the hand-written held-out queries play no part in the choice): per class,
  the share of rows routed to their own persona and the share of base rows routed;
* ``heldout``: the same candidates on the check's hand-written held-out queries (reported, not chosen on).

    PYTHONPATH=src python scripts/kway_routing_study.py RUN --cache /tmp/feats.pt [--out study.json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from prism_persona.config import GateConfig
from prism_persona.gated.gate import decide
from prism_persona.kits import safety_style
from prism_persona.train.check import load_heldout
from prism_persona.train.gate import (
    builtin_base_queries,
    gate_records,
    near_duplicate_clusters,
    new_base_queries,
    train_gate_on_records,
)

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "src/prism_persona/kits/safety_style/heldout.jsonl"


def jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def load_run(run: Path) -> dict:
    cfg = json.loads((run / "config.json").read_text())
    gcfg = dict(cfg["gate"])
    gcfg["threshold_bounds"] = list(gcfg["threshold_bounds"])
    gate_cfg = json.loads((run / "gate" / "gate_config.json").read_text())
    records = gate_records(jsonl(run / "verdicts.jsonl"))
    answers = {a["query_key"] for a in jsonl(run / "check" / "answers.jsonl")}
    intents = {r["query"]: r.get("intent", "") for r in jsonl(HELDOUT)}
    held = [q for q in load_heldout(HELDOUT) if q.key in answers]
    held_rows = [{"domain": q.domain, "query": q.query, "intent": intents.get(q.query, "")} for q in held]
    return {
        "gate": GateConfig(**gcfg),
        "seed": int(cfg.get("seed", 0)),
        "model": cfg["model"]["model"],
        "records": records,
        "personas": gate_cfg.get("personas") or [],
        "saved": gate_cfg,
        "heldout": held_rows,
    }


def features(run: dict, cache: Path, batch_size: int = 16) -> dict:
    if cache.is_file():
        return torch.load(cache)
    from prism_persona.gated.features import query_features
    from prism_persona.models import load_model

    model, tok = load_model(run["model"], dtype="float32", device="cpu")
    pooling = run["gate"].pooling
    out = {
        "train": query_features(model, tok, [r["query"] for r in run["records"]], batch_size, pooling),
        "heldout": query_features(model, tok, [r["query"] for r in run["heldout"]], batch_size, pooling),
        "builtin": query_features(
            model,
            tok,
            new_base_queries(builtin_base_queries(), [r["query"] for r in run["records"]]),
            batch_size,
            pooling,
        ),
    }
    torch.save(out, cache)
    return out


def expected(row: dict, personas: list[dict]) -> int:
    """The held-out row's expected class in the gate's numbering (0 base, k persona k)."""
    name = safety_style.expected_class(row)
    for i, p in enumerate(personas):
        if p["name"] == name:
            return i + 1
    return 0


def run_class(record: dict, personas: list[dict]) -> int:
    """A training row's class from the bootstrap's verdict: its domain's persona where it won, else base."""
    if not int(record["label"]):
        return 0
    for i, p in enumerate(personas):
        if record.get("domain") in p["domains"]:
            return i + 1
    return 0


def score(decided: list[int], classes: list[int], k: int) -> dict:
    """Confusion matrix (true class x decided: 0 base, k persona k), own-persona rate per persona class,
    base rows routed, and the macro recall over the classes."""
    m = [[0] * (k + 1) for _ in range(k + 1)]
    for t, d in zip(classes, decided):
        m[t][d] += 1
    rec = [m[c][c] / sum(m[c]) for c in range(k + 1) if sum(m[c])]
    return {
        "confusion": m,
        "own": [round(m[c][c] / sum(m[c]), 3) if sum(m[c]) else None for c in range(1, k + 1)],
        "base_routed": round(1 - m[0][0] / sum(m[0]), 3) if sum(m[0]) else None,
        "macro_recall": round(sum(rec) / len(rec), 3) if rec else None,
        # half for the persona rows (mean own-persona rate), half for the base rows (share kept on base)
        "persona_and_base": round(0.5 * sum(rec[1:]) / len(rec[1:]) + 0.5 * rec[0], 3) if len(rec) > 1 else None,
    }


def decisions(bundle, feats: torch.Tensor, rule: str = "default") -> list[int]:
    """The bundle's decision per row (0 base, k persona k): ``default`` = :func:`decide` as shipped (at 0.5:
    route where the most probable persona is more probable than base); ``1-P(base)`` = the rule before
    (route where 1 - P(base) of the temperature-scaled probabilities >= the threshold); ``1-P(base) T=1``
    = that rule on the unscaled probabilities. The abstain region and the persona floor apply to all."""
    with torch.no_grad():
        d = decide(bundle.gate, bundle.threshold, feats)
        if rule == "default":
            return (d.persona + 1).tolist()
        g = bundle.gate
        cp = d.class_probs if rule == "1-P(base)" else torch.softmax(g.class_logits(feats, temperature=1.0), -1)
        wanted = (1 - cp[:, 0]) >= bundle.threshold
        outside = g.outside(feats) | (d.class_probs[:, 1:].max(-1).values < g.min_confidence)
        routed = wanted & ~outside
        best = cp[:, 1:].argmax(-1) + 1
        return torch.where(routed, best, torch.zeros_like(best)).tolist()


def cv_folds(records: list[dict], classes: list[int], folds: int, seed: int, dedup: float) -> list[list[int]]:
    """Folds of row indices, near-duplicate clusters together, each (domain, class) cell spread over them."""
    clusters = near_duplicate_clusters([r["query"] for r in records], dedup)
    units: dict = {}
    for i, c in enumerate(clusters):
        units.setdefault(c, []).append(i)
    by_cell: dict = {}
    for m in units.values():
        by_cell.setdefault((records[m[0]].get("domain", ""), classes[m[0]]), []).append(m)
    rng = random.Random(seed)
    out: list[list[int]] = [[] for _ in range(folds)]
    start = 0
    for cell in sorted(by_cell):
        ms = by_cell[cell]
        rng.shuffle(ms)
        for j, m in enumerate(ms):
            out[(start + j) % folds] += m
        start += len(ms)
    return [sorted(f) for f in out]


def cross_validate(
    run: dict, feats: torch.Tensor, cfg: GateConfig, folds: int, repeats: int, rule: str, base_feats=None
) -> dict:
    records, personas = run["records"], run["personas"]
    classes = [run_class(r, personas) for r in records]
    k = len(personas)
    decided = [[0] * len(records) for _ in range(repeats)]
    for rep in range(repeats):
        for f in cv_folds(records, classes, folds, rep, cfg.dedup_jaccard):
            train = [i for i in range(len(records)) if i not in set(f)]
            b = train_gate_on_records(feats[train], [records[i] for i in train], cfg, run["seed"], base_feats, personas)
            for i, d in zip(f, decisions(b, feats[f], rule)):
                decided[rep][i] = d
    per = [score(d, classes, k) for d in decided]
    mean = lambda key, j=None: round(  # noqa: E731
        sum((p[key][j] if j is not None else p[key]) for p in per) / len(per), 3
    )
    return {
        "own": [mean("own", j) for j in range(k)],
        "base_routed": mean("base_routed"),
        "macro_recall": mean("macro_recall"),
        "persona_and_base": mean("persona_and_base"),
        "confusion_first_repeat": per[0]["confusion"],
    }


def diagnose(run: dict, feats: dict) -> dict:
    cfg, records, personas = run["gate"], run["records"], run["personas"]
    b = train_gate_on_records(feats["train"], records, cfg, run["seed"], None, personas)
    saved = run["saved"]
    same = {
        "threshold": (b.threshold, saved["threshold"]),
        "temperature": (b.gate.temperature, saved["temperature"]),
        "min_confidence": (b.gate.min_confidence, saved.get("min_confidence")),
        "best_epoch": (b.info["best_epoch"], saved["best_epoch"]),
        "ood_threshold": (b.info["ood_fit"].get("threshold"), saved["ood"]["threshold"]),
    }
    hx = feats["heldout"]
    with torch.no_grad():
        d = decide(b.gate, b.threshold, hx)
        raw = torch.softmax(b.gate.class_logits(hx, temperature=1.0), -1)
        outside = b.gate.outside(hx)
    rows = []
    for i, r in enumerate(run["heldout"]):
        cp = d.class_probs[i]
        rows.append(
            {
                "domain": r["domain"],
                "intent": r["intent"],
                "expected": expected(r, personas),
                "decided": int(d.persona[i]) + 1,
                "p_base": round(float(cp[0]), 3),
                "p_personas": [round(float(x), 3) for x in cp[1:]],
                "p_base_T1": round(float(raw[i, 0]), 3),
                "route_prob": round(float(d.probs[i]), 3),
                "argmax": int(cp.argmax()),
                "outside_region": bool(outside[i]),
                "query": r["query"],
            }
        )
    base_rows = [x for x in rows if x["expected"] == 0]
    routed = [x for x in base_rows if x["decided"]]
    return {
        "retrained_vs_saved": same,
        "threshold": b.threshold,
        "min_confidence": b.gate.min_confidence,
        "temperature": b.gate.temperature,
        "best_epoch": b.info["best_epoch"],
        "ood": b.info["ood_fit"],
        "class_counts": b.info.get("class_counts"),
        "heldout": score([x["decided"] for x in rows], [x["expected"] for x in rows], len(personas)),
        "base_rows": len(base_rows),
        "base_routed": len(routed),
        "base_routed_argmax_base": sum(1 for x in routed if x["argmax"] == 0),
        "base_routed_inside_region": sum(1 for x in routed if not x["outside_region"]),
        "base_rows_outside_region": sum(1 for x in base_rows if x["outside_region"]),
        "rows": rows,
    }


def candidates(base: GateConfig) -> dict:
    """name -> (gate settings, decision rule (:func:`decisions`), builtin base examples or not)."""
    out = {
        "default (best persona vs base)": (base, "default", False),
        "1-P(base) (the rule before)": (base, "1-P(base)", False),
        "1-P(base) at T=1": (base, "1-P(base) T=1", False),
    }
    for name, cfg, builtin in (
        ("temperature off", replace(base, temperature="off"), False),
        ("min_confidence off", replace(base, min_confidence="off"), False),
        ("ood_reference all", replace(base, ood_reference="all"), False),
        ("ood off", replace(base, ood="off"), False),
        ("patience 0 (no early stopping)", replace(base, patience=0), False),
        ("balance class", replace(base, balance="class"), False),
        ("balance none", replace(base, balance="none"), False),
        ("target preference", replace(base, target="preference"), False),
        ("val_fraction 0.5", replace(base, val_fraction=0.5), False),
        ("val_fraction 0.1", replace(base, val_fraction=0.1), False),
        ("base_queries builtin", base, True),
    ):
        out[name] = (cfg, "default", builtin)
        out[name + ", rule before"] = (cfg, "1-P(base)", builtin)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--what", default="diagnose,cv,heldout")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    t0 = time.perf_counter()
    run = load_run(args.run)
    feats = features(run, args.cache)
    what = set(args.what.split(","))
    out: dict = {"run": str(args.run), "personas": [p["name"] for p in run["personas"]]}
    if "diagnose" in what:
        out["diagnose"] = diagnose(run, feats)
        dg = out["diagnose"]
        print(json.dumps({k: v for k, v in dg.items() if k != "rows"}, indent=1))
        for x in dg["rows"]:
            if x["expected"] == 0:
                print(
                    f"{x['domain']:9s} {x['intent']:7s} dec={x['decided']} pb={x['p_base']:.2f} "
                    f"pp={x['p_personas']} pbT1={x['p_base_T1']:.2f} out={x['outside_region']} {x['query'][:60]}"
                )
    cands = candidates(run["gate"])
    if "cv" in what:
        out["cv"] = {}
        for name, (cfg, rule, builtin) in cands.items():
            bf = feats["builtin"] if builtin else None
            out["cv"][name] = r = cross_validate(run, feats["train"], cfg, args.folds, args.repeats, rule, bf)
            print(
                f"CV {name:34s} own={r['own']} base={r['base_routed']} macro={r['macro_recall']} pb={r['persona_and_base']}"
            )
    if "heldout" in what:
        out["heldout"] = {}
        classes = [expected(r, run["personas"]) for r in run["heldout"]]
        for name, (cfg, rule, builtin) in cands.items():
            bf = feats["builtin"] if builtin else None
            b = train_gate_on_records(feats["train"], run["records"], cfg, run["seed"], bf, run["personas"])
            dec = decisions(b, feats["heldout"], rule)
            out["heldout"][name] = r = score(dec, classes, len(run["personas"]))
            print(
                f"HELD {name:34s} own={r['own']} base={r['base_routed']} macro={r['macro_recall']} pb={r['persona_and_base']}"
            )
    out["seconds"] = round(time.perf_counter() - t0, 1)
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print("seconds", out["seconds"], file=sys.stderr)


if __name__ == "__main__":
    main()
