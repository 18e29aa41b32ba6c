"""Intent routing within a domain: which gate feature and training settings route held-out queries
best, measured on a kit's hand-written held-out queries (``route`` says which should be routed).

Trains the gate with the library's own code (``train_gate``, ``gate_targets``) on a finished
bootstrap's labels and reads the feature at several decoder layers and poolings; every setting runs
over several split seeds (the seed picks the gate's early-stopping split and its initialisation) and
prints the mean and standard deviation of the held-out AUC against ``route`` and the routing rates
(route = true / false, and per domain the worst of each) at the gate's threshold.

    python scripts/intent_gate_study.py RUN HELDOUT.jsonl [--seeds 5] [--noise 0.2] [--parts all]

``--noise`` flips that share of the training labels at random (a different draw per seed), as a
weak judge would. ``--parts`` (comma-separated): ``feature`` (pooling x layer), ``target`` (how ties
are labelled), ``prior`` (domain prior x class balance), ``size`` (training queries per domain).
Results: docs/method-check.md ("Intent routing within a domain").
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics as st
from dataclasses import replace

import torch

from prism_persona import config as C
from prism_persona.bootstrap.verify import load_labelled
from prism_persona.gated.features import gate_prompt, layer_output, pool_states, position_ids_from_mask, query_features
from prism_persona.models import decoder_layers, encode_prompts, load_model
from prism_persona.stats import auc
from prism_persona.train.gate import train_gate_on_records

LAYERS = (0, 1, 2, 4, 8)
POOLINGS = ("mean", "last", "max", "attn")


# ------------------------------------------------------------------------------------------ features


def pooled(h: torch.Tensor, mask: torch.Tensor, pooling: str, attn: torch.Tensor | None) -> torch.Tensor:
    """``mean``/``last`` as the gate computes them; ``max`` over real tokens; ``attn``: the states
    weighted by the last token's attention at that layer (mean over heads)."""
    if pooling in ("mean", "last"):
        return pool_states(h, mask, pooling)
    if pooling == "max":
        return h.float().masked_fill(mask[:, :, None] == 0, float("-inf")).max(1).values
    w = attn.float().mean(1)[:, -1, :] * mask  # [batch, seq]: the last (real, left-padded) token's row
    return (h.float() * (w / w.sum(1, keepdim=True))[:, :, None]).sum(1)


class _Stop(Exception):
    pass


@torch.no_grad()
def all_features(model, tok, queries: list[str], batch_size: int = 16) -> dict:
    """{(layer, pooling): [n, hidden]} for every layer in LAYERS and pooling in POOLINGS; one forward per
    batch that stops after the last layer needed (hooks capture each layer's output and attention)."""
    layers = decoder_layers(model)
    got: dict = {}
    hooks = [
        layers[k].register_forward_hook(lambda m, a, o, k=k: got.__setitem__(("h", k), layer_output(o))) for k in LAYERS
    ]
    hooks += [
        layers[k].self_attn.register_forward_hook(lambda m, a, o, k=k: got.__setitem__(("a", k), o[1])) for k in LAYERS
    ]

    def stop(m, a, o):
        raise _Stop

    hooks.append(layers[max(LAYERS)].register_forward_hook(stop))
    out: dict = {}
    try:
        for start in range(0, len(queries), batch_size):
            enc = encode_prompts(tok, [gate_prompt(tok, q) for q in queries[start : start + batch_size]])
            mask = enc["attention_mask"]
            try:
                model(**enc, position_ids=position_ids_from_mask(mask), use_cache=False)
            except _Stop:
                pass
            for k in LAYERS:
                for p in POOLINGS:
                    out.setdefault((k, p), []).append(pooled(got[("h", k)], mask, p, got[("a", k)]))
    finally:
        for h in hooks:
            h.remove()
    return {key: torch.cat(v) for key, v in out.items()}


# ------------------------------------------------------------------------------------------ the gate


def evaluate(feats, records, ho_feats, heldout, cfg, seeds: int, noise: float) -> dict:
    """Mean and spread over seeds of held-out AUC and routing rates for one setting."""
    route = [int(r["route"]) for r in heldout]
    doms = sorted({r["domain"] for r in heldout})
    rows = []
    for seed in range(seeds):
        rng = random.Random(1000 + seed)
        recs = [dict(r, label=1 - r["label"]) if rng.random() < noise else r for r in records]
        bundle = train_gate_on_records(feats, recs, cfg, seed)
        with torch.no_grad():
            prob = bundle.gate(ho_feats).tolist()
        hit = [p >= bundle.threshold for p in prob]

        def rate(pred, _hit=hit):
            sel = [h for h, r in zip(_hit, heldout) if pred(r)]
            return sum(sel) / len(sel)

        rows.append(
            {
                "auc": auc(prob, route),
                "pos": rate(lambda r: r["route"]),
                "neg": rate(lambda r: not r["route"]),
                "pos_min": min(rate(lambda r, d=d: r["route"] and r["domain"] == d) for d in doms),
                "neg_max": max(rate(lambda r, d=d: not r["route"] and r["domain"] == d) for d in doms),
                "dom_auc_min": min(
                    auc(
                        [p for p, r in zip(prob, heldout) if r["domain"] == d],
                        [y for y, r in zip(route, heldout) if r["domain"] == d],
                    )
                    or 0.0
                    for d in doms
                ),
            }
        )
    return {k: (st.mean(r[k] for r in rows), st.pstdev(r[k] for r in rows)) for k in rows[0]}


def line(name: str, m: dict) -> str:
    cell = lambda k: f"{m[k][0]:.2f} ± {m[k][1]:.2f}"  # noqa: E731
    return (
        f"| {name} | {cell('auc')} | {cell('dom_auc_min')} | {cell('pos')} | {cell('neg')} | "
        f"{m['pos_min'][0]:.2f} | {m['neg_max'][0]:.2f} |"
    )


HEADER = (
    "| setting | held-out AUC | worst domain's AUC | routed (route) | routed (no route) | "
    "worst domain routed (route) | worst domain routed (no route) |\n|---|---|---|---|---|---|---|"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("heldout")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--noise", type=float, default=0.0)
    ap.add_argument("--parts", default="feature,target,prior,size")
    ap.add_argument(
        "--oracle",
        help="a training queries file with the true route (`route`, or `intent` = harmful): adds rows where the "
        "gate is trained on those labels instead of the judge's (the feature's ceiling)",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    parts = set(args.parts.split(","))
    records = load_labelled(args.run)
    heldout = [json.loads(x) for x in open(args.heldout, encoding="utf-8") if x.strip()]
    saved = json.load(open(f"{args.run}/config.json", encoding="utf-8"))
    model, tok = load_model(saved["model"]["model"], "float32", "cpu")
    model.set_attn_implementation("eager")  # attention weights for the 'attn' pooling
    feats = all_features(model, tok, [r["query"] for r in records])
    ho = all_features(model, tok, [r["query"] for r in heldout])
    # the study's layer-0 features are the gate's own (the library's feature code)
    for p in ("mean", "last"):
        assert torch.allclose(
            feats[(0, p)], query_features(model, tok, [r["query"] for r in records], 16, p), atol=1e-4
        )
    doms = sorted({r["domain"] for r in records})
    wins = {
        d: (sum(r["label"] for r in records if r["domain"] == d), sum(r["domain"] == d for r in records)) for d in doms
    }
    print(f"## {args.run}: {len(records)} labelled queries, wins per domain {wins}; {len(heldout)} held-out;")
    print(f"label noise {args.noise:.0%}; {args.seeds} seeds; mean ± sd over seeds\n")
    base = C.GateConfig()

    def run(cfg):
        return evaluate(feats[(0, cfg.pooling)], records, ho[(0, cfg.pooling)], heldout, cfg, args.seeds, args.noise)

    if "feature" in parts:
        print("### pooling x layer (the LoRA would cover layers k+1..L-1)\n\n" + HEADER)
        for k in LAYERS:
            for p in POOLINGS:
                m = evaluate(
                    feats[(k, p)], records, ho[(k, p)], heldout, replace(base, pooling="mean"), args.seeds, args.noise
                )
                print(line(f"layer {k}, {p}", m), flush=True)
    if "target" in parts:
        print("\n### how ties are labelled (layer 0, mean)\n\n" + HEADER)
        for target in ("win", "preference"):
            print(line(f"target {target}", run(replace(base, target=target))), flush=True)
    if "prior" in parts:
        print("\n### domain prior x balance (layer 0, mean)\n\n" + HEADER)
        for prior in (0.0, 0.5, 1.0):
            for balance in ("domain", "class", "none"):
                print(
                    line(
                        f"prior {prior:g}, balance {balance}", run(replace(base, domain_prior=prior, balance=balance))
                    ),
                    flush=True,
                )
    if args.oracle:
        truth = {}
        for x in open(args.oracle, encoding="utf-8"):
            if x.strip():
                row = json.loads(x)
                truth[row["query"].strip()] = int(bool(row.get("route", row.get("intent") == "harmful")))
        oracle = [dict(r, label=truth[r["query"].strip()]) for r in records]
        print("\n### the gate trained on the true route instead of the judge's labels\n\n" + HEADER)
        for k, p in ((0, "mean"), (0, "last"), (4, "mean"), (8, "mean")):
            m = evaluate(feats[(k, p)], oracle, ho[(k, p)], heldout, base, args.seeds, args.noise)
            print(line(f"true route, layer {k}, {p}", m), flush=True)
    if "size" in parts:
        print("\n### training queries per domain (the first n of each domain, layer 0, mean)\n\n" + HEADER)
        total = min(wins[d][1] for d in doms)
        for n in sorted({max(4, total // 4), total // 2, 3 * total // 4, total}):
            keep = [i for i, r in enumerate(records) if sum(x["domain"] == r["domain"] for x in records[:i]) < n]
            sub = [records[i] for i in keep]
            m = evaluate(feats[(0, "mean")][keep], sub, ho[(0, "mean")], heldout, base, args.seeds, args.noise)
            print(line(f"{n} per domain", m), flush=True)


if __name__ == "__main__":
    main()
