"""Issue 29: does the abstain rule keep a kit's gate off queries it never saw?

For each example kit (safety: label = intent harmful; style: label = domain stories) a gate is trained
with the project's gate code (:func:`prism_persona.train.gate.train_gate_on_records`, GateConfig
defaults) on the kit's training queries, and its routing rate is measured with and without the abstain
rule (``gate.ood``) on: MMLU questions (every fixture file in tests/fixtures, as the eval prompts them),
MT-Bench first turns, the other kit's queries (training + held-out) and the kit's own held-out queries.
Layer-0 features only (no generation). Also the AUROC of each distance between the kit's own held-out
queries and the foreign ones (how well it separates, whatever the threshold).

    PYTHONPATH=src python scripts/ood_study.py --out docs/ood_study.json [--model SPEC] [--pooling mean]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import replace
from pathlib import Path

import torch

from prism_persona.config import GateConfig, ModelConfig
from prism_persona.evals.benchmarks.mmlu import load_mmlu, mmlu_prompt
from prism_persona.gated.features import query_features
from prism_persona.models import load_model
from prism_persona.stats import binary_metrics
from prism_persona.text import jaccard, word_set
from prism_persona.train.gate import (
    builtin_base_queries,
    fit_contrast,
    fit_ood,
    near_duplicate_clusters,
    ood_reference_rows,
    train_gate_on_records,
)

ROOT = Path(__file__).resolve().parents[1]
MMLU_FIXTURES = [
    "tests/fixtures/mmlu_hf.jsonl",
    "tests/fixtures/mmlu_hf.json",
    "tests/fixtures/mmlu_hf.csv",
    "tests/fixtures/mmlu_original",
    "tests/fixtures/mmlu_tricky",
]
MTBENCH = ["../shared/benchmarks/mt_bench_questions.jsonl", "/work/shared/benchmarks/mt_bench_questions.jsonl"]
KITS = {
    "safety": ("src/prism_persona/kits/safety", lambda r: int(r.get("intent") == "harmful")),
    "style": ("src/prism_persona/kits/style", lambda r: int(r.get("domain") == "stories")),
}
VARIANTS = [("off", "all", 1.0, 5)] + [
    (m, ref, q, k)
    for ref in ("all", "routed")
    for m, k in (("mahalanobis", 5), ("knn", 1), ("knn", 5))
    for q in (0.95, 0.99, 1.0)
]
"""(gate.ood, gate.ood_reference, gate.ood_quantile, gate.ood_k); the GateConfig default is marked."""


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def mmlu_queries() -> list[str]:
    seen, out = set(), []
    for rel in MMLU_FIXTURES:
        for it in load_mmlu(ROOT / rel):
            if it.question not in seen:
                seen.add(it.question)
                out.append(mmlu_prompt(it))
    return out


def mtbench_queries() -> list[str]:
    for rel in MTBENCH:
        p = (ROOT / rel) if not rel.startswith("/") else Path(rel)
        if p.is_file():
            return [r["turns"][0] for r in jsonl(p)]
    return [r["turns"][0] for r in jsonl(ROOT / "tests/fixtures/mtbench_small.jsonl")]


def auroc(pos: list[float], neg: list[float]) -> float:
    """P(score of a foreign query > score of an in-distribution one) (ties count half)."""
    return binary_metrics(pos + neg, [1] * len(pos) + [0] * len(neg), 0.5)["auc"]


def routing_rates(bundle, sets: dict) -> dict:
    """{set: {"routed", "routed_without_ood"}} of ``bundle`` on each feature set."""
    out = {}
    with torch.no_grad():
        for sname, x in sets.items():
            p, routed, _ = bundle.decide(x)[:3]
            out[sname] = {
                "n": int(x.shape[0]),
                "routed_without_ood": float((p >= bundle.threshold).float().mean()),
                "routed": float(routed.float().mean()),
            }
    return out


def foreign_base_study(name: str, other: str, kit: dict, records: list, feats: dict, pooling: str) -> dict:
    """The kit's gate (GateConfig defaults, abstain rule on) trained without / with the other kit's
    training queries added as label-0 examples, on the kit's held-out queries, MMLU, MT-Bench and the
    other kit's held-out queries (never trained on)."""
    sets = {
        "own_heldout": feats[f"{name}_heldout"],
        "mmlu": feats["mmlu"],
        "mtbench": feats["mtbench"],
        f"other_kit_{other}_heldout": feats[f"{other}_heldout"],
    }
    cfg = replace(GateConfig(), pooling=pooling)
    extra = [
        {"query": q, "domain": f"other:{other}", "label": 0, "key": f"x{i}"}
        for i, q in enumerate(r["query"] for r in kit["other_train"])
    ]
    out = {}
    for label, recs, x in (
        ("kit queries only", records, feats[f"{name}_train"]),
        (
            f"+ {len(extra)} {other} training queries as base",
            records + extra,
            torch.cat([feats[f"{name}_train"], feats[f"{other}_train"]]),
        ),
    ):
        bundle = train_gate_on_records(x, recs, cfg, seed=0)
        out[label] = routing_rates(bundle, sets)
    return out


def base_examples_study(name: str, other: str, records: list, feats: dict, held_route: list, pooling: str) -> dict:
    """The kit's gate trained without / with the built-in base examples (gate.base_queries = builtin),
    each with the abstain rule on (GateConfig default) and off: routing on the kit's held-out queries,
    MMLU, MT-Bench and the other kit's queries (training + held-out; never trained on here)."""
    sets = {
        "own_heldout": feats[f"{name}_heldout"],
        "mmlu": feats["mmlu"],
        "mtbench": feats["mtbench"],
        f"other_kit_{other}": torch.cat([feats[f"{other}_train"], feats[f"{other}_heldout"]]),
    }
    out = {}
    for ood in ("mahalanobis", "off"):
        cfg = replace(GateConfig(), pooling=pooling, ood=ood)
        for base_label, base in (("no base examples", None), ("builtin base examples", feats["builtin_base"])):
            bundle = train_gate_on_records(feats[f"{name}_train"], records, cfg, seed=0, base_features=base)
            row = routing_rates(bundle, sets)
            if all(v is not None for v in held_route):
                with torch.no_grad():
                    _, routed, _ = bundle.decide(sets["own_heldout"])[:3]
                y = [int(v) for v in held_route]
                row["own_heldout"]["balanced_accuracy"] = binary_metrics(routed.float().tolist(), y, 0.5)[
                    "balanced_accuracy"
                ]
                row["own_heldout"]["expected_route_rate"] = sum(y) / len(y)
            row["base_examples"] = bundle.info["base_examples"]
            out[f"ood={ood}, {base_label}"] = row
    return out


CONTRAST_VARIANTS = [("off", 5), ("mahalanobis", 5), ("knn", 1), ("knn", 5)]
"""(method of the everyday region, its k) for :func:`contrast_study`; the wins' region is the default."""


def routed_rates(bundle, sets: dict, held_route: list) -> dict:
    """{set: {"n", "routed", ...}} with the own held-out queries' TPR / FPR / balanced accuracy."""
    out = {}
    with torch.no_grad():
        for sname, x in sets.items():
            d = bundle.decide(x)
            entry = {"n": int(x.shape[0]), "routed": float(d.routed.float().mean())}
            if sname == "own_heldout" and all(v is not None for v in held_route):
                y = [int(v) for v in held_route]
                r = d.routed.float().tolist()
                pos = [ri for ri, yi in zip(r, y) if yi]
                neg = [ri for ri, yi in zip(r, y) if not yi]
                entry["tpr"] = sum(pos) / len(pos)
                entry["fpr"] = sum(neg) / len(neg)
                entry["balanced_accuracy"] = (entry["tpr"] + 1 - entry["fpr"]) / 2
            out[sname] = entry
    return out


def contrast_study(name: str, other: str, records: list, feats: dict, texts: dict, held_route: list, pooling: str):
    """Issue 29, the abstain rule relative to an everyday reference (``gate.ood_contrast``): the kit's gate
    (GateConfig defaults: abstain region on the wins, Mahalanobis, q = 1, scale 1.25) with an everyday
    region fitted on the built-in base queries (never in the probability); a query is routed only if it
    is inside the wins' region and its distance to the wins over its distance to the everyday queries is
    at most the largest such ratio of the wins themselves (cross-fitted). Also the wins' region fitted on
    a random third of the wins (what a pipeline run has; mean over 3 draws; the gate's probability
    stays the one trained on all queries)."""
    sets = {
        "own_heldout": feats[f"{name}_heldout"],
        "mmlu": feats["mmlu"],
        "mtbench": feats["mtbench"],
        f"other_kit_{other}": torch.cat([feats[f"{other}_train"], feats[f"{other}_heldout"]]),
    }
    cfg = replace(GateConfig(), pooling=pooling)
    bundle = train_gate_on_records(feats[f"{name}_train"], records, cfg, seed=0)
    gate = bundle.gate
    full = gate.ood
    labels = [r["label"] for r in records]
    wins = ood_reference_rows(labels, cfg.ood_reference)
    clusters = near_duplicate_clusters([r["query"] for r in records], cfg.dedup_jaccard)
    out: dict = {}
    for share, draws in (("all wins", [None]), ("a third of the wins", [0, 1, 2])):
        for method, kk in CONTRAST_VARIANTS:
            rows = []
            for draw in draws:
                if draw is None:
                    gate.ood = full
                else:
                    rng = random.Random(draw)
                    ref = sorted(rng.sample(wins, max(8, len(wins) // 3)))
                    gate.ood, _ = fit_ood(
                        gate,
                        feats[f"{name}_train"][ref],
                        cfg.ood,
                        cfg.ood_quantile,
                        cfg.ood_k,
                        0,
                        [clusters[i] for i in ref],
                        cfg.ood_scale,
                    )
                ref = wins if draw is None else ref
                gate.ood_contrast, info = fit_contrast(
                    gate,
                    feats[f"{name}_train"][ref],
                    feats["builtin_base"],
                    method,
                    cfg.ood_quantile,
                    kk,
                    0,
                    [clusters[i] for i in ref],
                )
                rows.append(routed_rates(bundle, sets, held_route))
            gate.ood_contrast = None
            mean = {s: {k: sum(r[s][k] for r in rows) / len(rows) for k in rows[0][s]} for s in rows[0]}
            key = f"{share}, contrast " + (
                "off (today)" if method == "off" else f"{method}" + (f" k={kk}" if method == "knn" else "")
            )
            out[key] = {"sets": mean, "draws": len(rows), "everyday_fit": info}
    gate.ood = full
    return out


def generalist_contrast_study(texts: dict, feats: dict) -> dict:
    """The worst case of ``gate.ood_contrast``: a persona whose domain IS everyday requests. The built-in
    queries are shuffled (5 seeds) and cut into an everyday reference (89), the persona's wins (45, or
    15 as a run has) and its held-out queries (44); a gate that routes everything (only the abstain rule
    decides): held-out routed with the wins' region alone and with the contrast."""
    from prism_persona.gated.gate import Gate, decide

    qs, x = texts["builtin_base"], feats["builtin_base"]
    cfg = GateConfig()
    out: dict = {}
    for seed in range(5):
        idx = list(range(len(qs)))
        random.Random(seed).shuffle(idx)
        every, wins, held = idx[:89], idx[89:134], idx[134:]
        for nw in (45, 15):
            w = wins[:nw]
            gate = Gate(x.shape[1], [], dropout=0.0, pooling="mean")
            gate.set_standardisation(x[w])
            with torch.no_grad():
                gate.mlp[-1].weight.zero_()
                gate.mlp[-1].bias.fill_(3.0)
            cl = near_duplicate_clusters([qs[i] for i in w], cfg.dedup_jaccard)
            gate.ood, _ = fit_ood(gate, x[w], cfg.ood, cfg.ood_quantile, cfg.ood_k, 0, cl, cfg.ood_scale)
            before = float(decide(gate, 0.5, x[held]).routed.float().mean())
            gate.ood_contrast, _ = fit_contrast(gate, x[w], x[every], cfg.ood, cfg.ood_quantile, cfg.ood_k, 0, cl)
            after = float(decide(gate, 0.5, x[held]).routed.float().mean())
            out.setdefault(f"{nw} wins", []).append({"seed": seed, "without": before, "with": after, "n": len(held)})
    return out


def builtin_overlap(texts: dict) -> dict:
    """The largest word-set Jaccard between a built-in base example and any query of each measurement
    set (the built-in list must not contain the evaluation sets' texts)."""
    base = [word_set(q) for q in texts["builtin_base"]]
    out = {}
    for key, qs in texts.items():
        if key != "builtin_base":
            out[key] = max(jaccard(b, word_set(q)) for b in base for q in qs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/ood_study.json")
    ap.add_argument("--model", default=None)
    ap.add_argument("--pooling", default="mean", choices=("mean", "last"))
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    spec = args.model or ModelConfig().model
    model, tok = load_model(spec, dtype="float32", device="cpu")
    kits = {}
    for name, (folder, label) in KITS.items():
        train = jsonl(ROOT / folder / "train_queries.jsonl")
        held = jsonl(ROOT / folder / "heldout.jsonl")
        kits[name] = {"train": train, "heldout": held, "label": label}
    for name, k in kits.items():
        k["other_train"] = next(o["train"] for n, o in kits.items() if n != name)
    texts = {
        "mmlu": mmlu_queries(),
        "mtbench": mtbench_queries(),
        "builtin_base": builtin_base_queries(),
    }
    for name, k in kits.items():
        texts[f"{name}_train"] = [r["query"] for r in k["train"]]
        texts[f"{name}_heldout"] = [r["query"] for r in k["heldout"]]
    feats = {key: query_features(model, tok, qs, args.batch_size, args.pooling) for key, qs in texts.items()}
    results: dict = {
        "model": spec,
        "pooling": args.pooling,
        "sizes": {k: len(v) for k, v in texts.items()},
        "kits": {},
    }
    for name, k in kits.items():
        other = [o for o in kits if o != name][0]
        records = [
            {"query": r["query"], "domain": r.get("domain", ""), "label": k["label"](r), "key": str(i)}
            for i, r in enumerate(k["train"])
        ]
        base_cfg = replace(GateConfig(), pooling=args.pooling, ood="off")
        bundle = train_gate_on_records(feats[f"{name}_train"], records, base_cfg, seed=0)
        gate, thr = bundle.gate, bundle.threshold
        clusters = near_duplicate_clusters([r["query"] for r in records], base_cfg.dedup_jaccard)
        sets = {
            "own_heldout": feats[f"{name}_heldout"],
            "mmlu": feats["mmlu"],
            "mtbench": feats["mtbench"],
            f"other_kit_{other}": torch.cat([feats[f"{other}_train"], feats[f"{other}_heldout"]]),
        }
        held_route = [r.get("route") for r in k["heldout"]]
        out: dict = {"threshold": thr, "n_train": len(records), "variants": {}}
        labels = [r["label"] for r in records]
        default = GateConfig()
        for method, reference, q, kk in VARIANTS:
            ref = ood_reference_rows(labels, reference)
            region, info = fit_ood(gate, feats[f"{name}_train"][ref], method, q, kk, 0, [clusters[i] for i in ref])
            gate.ood = region
            row: dict = {"fit": info, "sets": {}}
            with torch.no_grad():
                for sname, x in sets.items():
                    p, routed, abst = bundle.decide(x)[:3]
                    entry = {
                        "n": int(x.shape[0]),
                        "routed_without_ood": float((p >= thr).float().mean()),
                        "routed": float(routed.float().mean()),
                        "abstained": float(abst.float().mean()),
                    }
                    if sname == "own_heldout" and all(v is not None for v in held_route):
                        y = [int(v) for v in held_route]
                        entry["balanced_accuracy_without_ood"] = binary_metrics(p.tolist(), y, thr)["balanced_accuracy"]
                        entry["balanced_accuracy"] = binary_metrics(routed.float().tolist(), y, 0.5)[
                            "balanced_accuracy"
                        ]
                        entry["expected_route_rate"] = sum(y) / len(y)
                    row["sets"][sname] = entry
                if region is not None:
                    own = sets["own_heldout"]
                    foreign = torch.cat([sets[s] for s in sets if s != "own_heldout"])
                    d_own, d_far = (region.score(gate.standardise(x)) for x in (own, foreign))
                    row["auroc_own_heldout_vs_foreign"] = auroc(d_far.tolist(), d_own.tolist())
                    # what the rule decides: among the queries the gate would route, familiar vs foreign
                    r_own, r_far = gate(own) >= thr, gate(foreign) >= thr
                    row["auroc_routed_own_vs_foreign"] = auroc(d_far[r_far].tolist(), d_own[r_own].tolist())
            key = (
                "off" if method == "off" else f"{method} {reference} q={q:g}" + (f" k={kk}" if method == "knn" else "")
            )
            if (method, reference, q) == (default.ood, default.ood_reference, default.ood_quantile):
                key += " (default)"
            out["variants"][key] = row
            gate.ood = None
        # the second idea, simulated: the bootstrap adds queries of other domains as "base"
        # examples. Here: the other kit's TRAINING queries, label 0; scored on its HELD-OUT queries only
        out["foreign_base_examples"] = foreign_base_study(name, other, k, records, feats, args.pooling)
        # the second idea as shipped: gate.base_queries = builtin (with and without)
        out["builtin_base_examples"] = base_examples_study(name, other, records, feats, held_route, args.pooling)
        # an abstain rule relative to the everyday queries (gate.ood_contrast)
        out["everyday_contrast"] = contrast_study(name, other, records, feats, texts, held_route, args.pooling)
        results["kits"][name] = out
    results["builtin_max_jaccard_to_measurement_sets"] = builtin_overlap(texts)
    results["everyday_contrast_generalist"] = generalist_contrast_study(texts, feats)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    for name, out in results["kits"].items():
        print(f"== {name} kit (threshold {out['threshold']:.3f})")
        for key, row in out["variants"].items():
            cells = " ".join(f"{s}={e['routed']:.0%}({e['routed_without_ood']:.0%})" for s, e in row["sets"].items())
            au = (
                row.get("auroc_own_heldout_vs_foreign", float("nan")),
                row.get("auroc_routed_own_vs_foreign", float("nan")),
            )
            print(f"{key:36s} auroc={au[0]:.3f}/{au[1]:.3f} {cells}")
    for name, out in results["kits"].items():
        for label, sets in out["foreign_base_examples"].items():
            cells = " ".join(f"{s}={e['routed']:.0%}({e['routed_without_ood']:.0%})" for s, e in sets.items())
            print(f"{name}: {label}: {cells}")
    for name, out in results["kits"].items():
        for label, sets in out["builtin_base_examples"].items():
            cells = " ".join(
                f"{s}={e['routed']:.0%}" + (f"(bacc {e['balanced_accuracy']:.2f})" if "balanced_accuracy" in e else "")
                for s, e in sets.items()
                if isinstance(e, dict)
            )
            print(f"{name}: {label}: {cells}")
    for name, out in results["kits"].items():
        for label, row in out["everyday_contrast"].items():
            cells = " ".join(
                f"{s}={e['routed']:.1%}"
                + (f"(tpr {e['tpr']:.2f} fpr {e['fpr']:.2f} bacc {e['balanced_accuracy']:.2f})" if "tpr" in e else "")
                for s, e in row["sets"].items()
            )
            print(f"{name}: {label}: {cells}")
    for label, rows in results["everyday_contrast_generalist"].items():
        print("generalist persona,", label, " ".join(f"{r['without']:.2f}->{r['with']:.2f}" for r in rows))
    print("builtin max Jaccard:", results["builtin_max_jaccard_to_measurement_sets"])
    print(f"{results['seconds']} s")


if __name__ == "__main__":
    main()
