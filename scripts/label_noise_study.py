"""Hard labels vs the judge's margin (``gate.target=margin``) vs an abstain band
(``judge.abstain_margin``), on the style kit with a simulated noisy judge.

    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/label_noise_study.py

The style kit's 60 hand-written training queries get the label the kit's rule gives them (the persona
should be used on stories, not on cooking). A simulated judge sees each pair through noise: its
both-order log-prob margin is ``+1`` (stories) or ``-1`` (cooking) plus Gaussian noise whose width makes
a share ``p`` of the hard labels (margin > 0) wrong. The gate is trained on the embedded model's
layer-0 features with each label variant and measured on the kit's 40 hand-written held-out queries:
AUC and routing rate per domain (threshold 0.5), mean over 8 noise draws.
"""

from __future__ import annotations

import json
import logging
import random
import statistics as st
from pathlib import Path

import torch

from prism_persona import config as C
from prism_persona.gated.features import query_features
from prism_persona.models import load_model
from prism_persona.stats import auc
from prism_persona.train.gate import gate_records, train_gate_on_records

KIT = Path(__file__).resolve().parents[1] / "src" / "prism_persona" / "kits" / "style"
NOISE = {0.0: 0.05, 0.2: 1 / 0.8416, 0.35: 1 / 0.3853}
"""label noise p -> the Gaussian width that flips a share p of the hard labels."""
BAND = 0.5


def read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def noisy_records(train: list[dict], sigma: float, rng: random.Random) -> list[dict]:
    out = []
    for r in train:
        margin = (1.0 if r["domain"] == "stories" else -1.0) + rng.gauss(0.0, sigma)
        out.append(dict(r, margin=margin, label=int(margin > 0), winner="persona" if margin > 0 else "base"))
    return out


def variant(recs: list[dict], name: str) -> tuple[list[dict], str]:
    """(records the gate trains on, gate.target) of one label variant."""
    if name.endswith("+abstain"):
        recs = gate_records([dict(r, abstain=abs(r["margin"]) < BAND) for r in recs])
    return recs, "margin" if name.startswith("margin") else "win"


def main() -> None:
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    train, held = read(KIT / "train_queries.jsonl"), read(KIT / "heldout.jsonl")
    model, tok = load_model("smollm2-135m-instruct", "float32", "cpu")
    f_train = query_features(model, tok, [r["query"] for r in train], 16, "mean")
    f_held = query_features(model, tok, [r["query"] for r in held], 16, "mean")
    y_held = [int(r["domain"] == "stories") for r in held]
    index = {r["query"]: i for i, r in enumerate(train)}
    print("| label noise | labels | held-out AUC | routed stories | routed cooking | rows used |")
    print("|---|---|---|---|---|---|")
    for p, sigma in NOISE.items():
        for name in ("hard", "margin", "hard+abstain", "margin+abstain"):
            aucs, rs, rc, rows = [], [], [], []
            for seed in range(8):
                recs, target = variant(noisy_records(train, sigma, random.Random(1000 * seed + int(100 * p))), name)
                feats = f_train[[index[r["query"]] for r in recs]]
                cfg = C.GateConfig(target=target)
                bundle = train_gate_on_records(feats, recs, cfg, seed)
                with torch.no_grad():
                    probs = bundle.gate(f_held).tolist()
                aucs.append(auc(probs, y_held) or 0.0)
                routed = [pr >= bundle.threshold for pr in probs]
                rs.append(st.mean(x for x, y in zip(routed, y_held) if y))
                rc.append(st.mean(x for x, y in zip(routed, y_held) if not y))
                rows.append(len(recs))
            print(
                f"| {p:.2f} | {name} | {st.mean(aucs):.2f} | {st.mean(rs):.2f} | {st.mean(rc):.2f} | {st.mean(rows):.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
