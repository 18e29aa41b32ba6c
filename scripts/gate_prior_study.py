"""The gate with per-query labels vs a domain prior (``gate.domain_prior``), trained on a run's real
labels (with a share of them flipped at random, as a weak judge would) and measured on hand-written
held-out queries. Prints held-out AUC and routing rates per setting (mean over 4 seeds).

    python scripts/gate_prior_study.py RUN HELDOUT.jsonl REWARDED_DOMAIN[,...]

e.g. ``python scripts/gate_prior_study.py runs/style src/prism_persona/kits/style/heldout.jsonl stories`` after the
README's "see it work" run. Results of 2026-11-24: docs/method-check.md.
"""

import json
import logging
import random
import statistics as st
import sys

import torch

from prism_persona import config as C
from prism_persona.bootstrap.verify import load_labelled
from prism_persona.gated.features import query_features
from prism_persona.models import load_model
from prism_persona.stats import auc
from prism_persona.train.gate import train_gate_on_records


def main(run: str, heldout: str, rewarded: list) -> None:
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    recs = load_labelled(run)
    ho = [json.loads(line) for line in open(heldout, encoding="utf-8") if line.strip()]
    saved = json.load(open(f"{run}/config.json", encoding="utf-8"))
    model, tok = load_model(saved["model"]["model"], "float32", "cpu")
    ftr = query_features(model, tok, [r["query"] for r in recs], 16, "mean")
    fho = query_features(model, tok, [r["query"] for r in ho], 16, "mean")
    yho = [int(r["domain"] in rewarded) for r in ho]
    doms = sorted({r["domain"] for r in ho})
    print(
        "training wins per domain:",
        {d: (sum(r["label"] for r in recs if r["domain"] == d), sum(r["domain"] == d for r in recs)) for d in doms},
    )
    for noise in (0.0, 0.2, 0.35):
        for prior in (0.0, 0.5, 1.0):
            res = []
            for seed in range(4):
                rng = random.Random(100 + seed)
                noisy = [dict(r, label=(1 - r["label"]) if rng.random() < noise else r["label"]) for r in recs]
                cfg = C.GateConfig(domain_prior=prior)
                b = train_gate_on_records(ftr, noisy, cfg, seed)
                with torch.no_grad():
                    p = b.gate(fho).tolist()
                routed = {
                    d: sum(pp >= b.threshold for pp, r in zip(p, ho) if r["domain"] == d)
                    / sum(r["domain"] == d for r in ho)
                    for d in doms
                }
                res.append((auc(p, yho), routed))
            print(
                f"noise {noise:.2f} prior {prior:.1f}: held-out AUC {st.mean(r[0] for r in res):.2f} "
                f"(min {min(r[0] for r in res):.2f}) | routed "
                + " ".join(f"{d} {st.mean(r[1][d] for r in res):.2f}" for d in doms),
                flush=True,
            )


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], sys.argv[3].split(","))
