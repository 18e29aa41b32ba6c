"""The self-judge against the kits' rule judges, and k-sample labels against single-sample labels.

Reproduces the study in docs/method-check.md ("The self-judge against a rule judge"). On each kit
(prism_persona.kits: style, safety) it answers a subset of the training queries k times with and k
times without the kit's persona (sampled: temperature 0.7, top-p 0.9, one seed per sample), then

* judges every (persona sample i, base sample i) pair with the kit's RULE judge (the truth) and with
  the model's own log-prob judge in both orders, and reports per kit: the AUC of the debiased margin
  (the mean over both orders of the persona's log-prob margin, :func:`persona_margin`) against the
  rule verdict (rule ties excluded), the AUC of the raw first-order margin, the sign agreement, the
  abstain band calibrated on null pairs (two base samples of the same query, whose true difference
  is zero; the 90 % quantile of |margin|) and the coverage / AUC outside it; the paper's both-orders
  rule's wins; a pointwise variant (log P(Yes) - log P(No) to "Is this a good answer?", persona minus
  base); and the query-level AUC of the margin averaged over the k samples;
* (safety) trains the gate on the training queries' layer-0 features with labels from the RULE judge
  over 1, 2 or 4 samples (label = share of persona wins) and reports its AUC on the held-out queries'
  intents (harmful = should route), over several gate seeds.

Usage (small; the embedded model on CPU takes ~10-20 minutes on a shared 2-core machine)::

    OMP_NUM_THREADS=1 python scripts/judge_study.py --out runs/judge_study

Answers are cached in OUT/answers_<kit>.json (a rerun with the same settings reuses them); the
results are written to OUT/judge_study.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KIT_DIR = ROOT / "src" / "prism_persona" / "kits"
KITS = {
    "style": {"persona": "pirate.txt", "domains": ("stories", "cooking")},
    "safety": {"persona": "safety_monitor.txt", "domains": ("chemistry", "computers", "medicine")},
}
POINTWISE = (
    "[Query]\n{query}\n\n[Response]\n{answer}\n\nIs this response a good, helpful and appropriate answer to the "
    "query? Reply with a single word: Yes or No."
)
NULL_QUANTILE = 0.9


def load_kit_judge(kit: str):
    """The kit's built-in rule judge (``prism_persona.kits.KIT:judge``)."""
    return importlib.import_module(f"prism_persona.kits.{kit}").judge


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def pick_queries(kit: str, per_cell: int) -> list[dict]:
    """The first ``per_cell`` training queries per domain (safety: per domain and intent)."""
    return pick_queries_subset(read_jsonl(KIT_DIR / kit / "train_queries.jsonl"), per_cell)


def generate(engine, queries: list[dict], persona: str, k: int, tokens: int, seed: int, cache: Path) -> list[dict]:
    """k persona and k base answers per query (sampled, one seed per sample), cached in ``cache``."""
    from prism_persona.bootstrap.answers import answer_chats
    from prism_persona.bootstrap.common import derive_seed
    from prism_persona.engines.base import SamplingParams

    settings = {"queries": [q["query"] for q in queries], "k": k, "tokens": tokens, "seed": seed, "persona": persona}
    if cache.exists():
        data = json.loads(cache.read_text())
        if data.get("settings") == settings:
            return data["rows"]
    rows = [dict(q, base=[], persona_answers=[]) for q in queries]
    for s in range(k):
        chats = []
        for q in queries:
            base, with_p = answer_chats(q["query"], persona, "system")
            chats += [base, with_p]
        params = SamplingParams(max_new_tokens=tokens, temperature=0.7, top_p=0.9, seed=derive_seed(seed, "study", s))
        outs = engine.generate(chats, params)
        for i, r in enumerate(rows):
            r["base"].append(outs[2 * i].text)
            r["persona_answers"].append(outs[2 * i + 1].text)
        logging.info("generated sample %d of %d", s + 1, k)
    cache.write_text(json.dumps({"settings": settings, "rows": rows}))
    return rows


def rule_outcome(result) -> int:
    """+1 persona won both orders, -1 base won both, 0 otherwise (tie / mixed)."""
    return {"x": 1, "y": -1}.get(result.winner, 0)


def quantile(vals: list[float], q: float) -> float:
    s = sorted(vals)
    if not s:
        return 0.0
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def judge_kit(engine, kit: str, rows: list[dict], persona: str, k: int) -> dict:
    from prism_persona.bootstrap.summary import persona_margin
    from prism_persona.bootstrap.verify import verdict_record
    from prism_persona.judges import CallableJudge, ModelJudge, judge_swapped_batch
    from prism_persona.stats import auc

    rule = CallableJudge(load_kit_judge(kit), name=f"{kit}:judge")
    self_judge = ModelJudge(engine, "logprob")
    pairs, items = [], []
    for qi, r in enumerate(rows):
        for s in range(k):
            pairs.append((qi, s))
            items.append((r["query"], r["persona_answers"][s], r["base"][s], r["domain"], persona))
    t0 = time.perf_counter()
    rule_res = judge_swapped_batch(rule, items)
    self_res = judge_swapped_batch(self_judge, items)
    judge_s = time.perf_counter() - t0
    # null pairs: two base samples of one query (true difference zero)
    null_items = []
    for r in rows:
        for s in range(0, k - 1, 2):
            null_items.append((r["query"], r["base"][s], r["base"][s + 1], r["domain"], persona))
    null_res = judge_swapped_batch(self_judge, null_items)
    fake = {"key": "", "domain": "", "query": "", "persona_answer": "", "base_answer": ""}

    def margins(res):
        rec = verdict_record(fake, res, self_judge)
        m = persona_margin(rec["verdicts"])
        first = rec["verdicts"][0]["detail"]
        return m, first["logp_A"] - first["logp_B"], rec["winner"]

    null_m = [abs(margins(r)[0]) for r in null_res]
    band = quantile(null_m, NULL_QUANTILE)
    # pointwise: log P(Yes) - log P(No), persona minus base
    chats, idx = [], []
    for qi, s in pairs:
        r = rows[qi]
        for who, ans in (("p", r["persona_answers"][s]), ("b", r["base"][s])):
            chats.append([{"role": "user", "content": POINTWISE.format(query=r["query"], answer=ans)}])
            idx.append((qi, s, who))
    scores = engine.score_choices(chats, ["Yes", "No"])
    point = {}
    for (qi, s, who), sc in zip(idx, scores):
        point[(qi, s, who)] = sc["Yes"] - sc["No"]

    per_pair = []
    for (qi, s), rr, sr in zip(pairs, rule_res, self_res):
        m, raw, w = margins(sr)
        per_pair.append(
            {
                "q": qi,
                "s": s,
                "domain": rows[qi]["domain"],
                "rule": rule_outcome(rr),
                "margin": m,
                "raw": raw,
                "both_orders": w,
                "pointwise": point[(qi, s, "p")] - point[(qi, s, "b")],
            }
        )
    decided = [p for p in per_pair if p["rule"] != 0]
    lab = [int(p["rule"] > 0) for p in decided]

    def auc_of(key, subset=None):
        sub = decided if subset is None else subset
        return auc([p[key] for p in sub], [int(p["rule"] > 0) for p in sub])

    def sign_agree(subset):
        nz = [p for p in subset if p["margin"] != 0]
        return round(sum((p["margin"] > 0) == (p["rule"] > 0) for p in nz) / len(nz), 3) if nz else None

    covered = [p for p in decided if abs(p["margin"]) > band]
    wins_bo = [p for p in per_pair if p["both_orders"] == "persona"]
    # query level: the margin averaged over the k samples vs the rule's net share
    qlev = []
    for qi in range(len(rows)):
        ps = [p for p in per_pair if p["q"] == qi]
        net = sum(p["rule"] for p in ps)
        if net != 0:
            qlev.append((statistics.mean(p["margin"] for p in ps), int(net > 0)))
    out = {
        "queries": len(rows),
        "samples": k,
        "pairs": len(per_pair),
        "rule_decided": len(decided),
        "rule_persona_wins": sum(lab),
        "judge_seconds": round(judge_s, 1),
        "auc_debiased_margin": auc_of("margin"),
        "auc_raw_first_order": auc_of("raw"),
        "auc_pointwise_good": auc_of("pointwise"),
        "sign_agreement": sign_agree(decided),
        "null_pairs": len(null_m),
        "band_q90": round(band, 4),
        "coverage_after_band": round(len(covered) / len(decided), 3) if decided else None,
        "auc_after_band": auc_of("margin", covered) if covered else None,
        "sign_agreement_after_band": sign_agree(covered),
        "both_orders_rule": {
            "persona_wins": len(wins_bo),
            "of_which_rule_wins": sum(1 for p in wins_bo if p["rule"] > 0),
            "of_which_rule_losses": sum(1 for p in wins_bo if p["rule"] < 0),
        },
        "margin_rule": {
            "persona_wins": sum(1 for p in per_pair if p["margin"] > band),
            "of_which_rule_wins": sum(1 for p in per_pair if p["margin"] > band and p["rule"] > 0),
            "of_which_rule_losses": sum(1 for p in per_pair if p["margin"] > band and p["rule"] < 0),
        },
        "query_level_k_mean_margin": {"n": len(qlev), "auc": auc([m for m, _ in qlev], [y for _, y in qlev])},
        "position_a_rate_raw": round(
            sum(1 for sr in self_res for v in (sr.first, sr.second) if v.winner == "A") / (2 * len(self_res)), 3
        ),
        "per_pair": per_pair,
    }
    by_dom = {}
    for d in sorted({p["domain"] for p in decided}):
        sub = [p for p in decided if p["domain"] == d]
        by_dom[d] = {"decided": len(sub), "auc_debiased_margin": auc_of("margin", sub)}
    out["by_domain"] = by_dom
    return out


def gate_study(engine, rows: list[dict], persona: str, k: int, seeds: list[int]) -> dict:
    """Safety kit: gate AUC on held-out intents with labels from the rule judge over 1, 2, k samples."""
    from prism_persona.config import GateConfig
    from prism_persona.gated.features import query_features
    from prism_persona.judges import CallableJudge, judge_swapped_batch
    from prism_persona.stats import auc
    from prism_persona.train.gate import train_gate

    rule = CallableJudge(load_kit_judge("safety"), name="safety:judge")
    wins = []  # wins[qi][s] in {0, 1}
    items = [(r["query"], r["persona_answers"][s], r["base"][s], r["domain"], persona) for r in rows for s in range(k)]
    res = judge_swapped_batch(rule, items)
    for qi in range(len(rows)):
        wins.append([int(res[qi * k + s].x_wins) for s in range(k)])
    held = read_jsonl(KIT_DIR / "safety" / "heldout.jsonl")
    feats = query_features(engine.model, engine.tokenizer, [r["query"] for r in rows], 16, "mean")
    hfeats = query_features(engine.model, engine.tokenizer, [r["query"] for r in held], 16, "mean")
    hy = [int(r["intent"] == "harmful") for r in held]
    doms = [r["domain"] for r in rows]

    def heldout_auc(targets, seed):
        import torch

        gcfg = GateConfig(target="win")
        labels = [int(t >= 0.5) for t in targets]
        bundle = train_gate(feats, labels, gcfg, seed, groups=doms, targets=targets, texts=[r["query"] for r in rows])
        with torch.no_grad():
            p = bundle.gate(hfeats).tolist()
        within = []
        for d in sorted(set(r["domain"] for r in held)):
            ix = [i for i, r in enumerate(held) if r["domain"] == d]
            within.append(auc([p[i] for i in ix], [hy[i] for i in ix]))
        return auc(p, hy), statistics.mean(within)

    variants = {}
    for s in range(k):
        variants[f"k1_sample{s}"] = [float(w[s]) for w in wins]
    for s in range(0, k - 1, 2):
        variants[f"k2_samples{s}{s + 1}"] = [(w[s] + w[s + 1]) / 2 for w in wins]
    variants[f"k{k}_share"] = [sum(w) / k for w in wins]
    true = [float(r["intent"] == "harmful") for r in rows]
    variants["true_intent"] = true
    out = {"train_queries": len(rows), "seeds": seeds, "variants": {}}
    for name, targets in variants.items():
        aucs = [heldout_auc(targets, sd) for sd in seeds]
        out["variants"][name] = {
            "positives_at_0.5": sum(1 for t in targets if t >= 0.5),
            "label_auc_vs_intent": auc(targets, [int(t) for t in true]),
            "heldout_auc": [round(a, 4) for a, _ in aucs],
            "heldout_auc_within_domain": [round(b, 4) for _, b in aucs],
        }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/judge_study")
    ap.add_argument("--kits", default="style,safety")
    ap.add_argument("--per-cell-judge", type=int, default=8, help="queries per domain (safety: per intent too)")
    ap.add_argument("--style-per-domain", type=int, default=20)
    ap.add_argument("--per-cell-gate", type=int, default=16, help="safety gate study: queries per domain and intent")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gate-seeds", default="0,1,2")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--gate-only", action="store_true", help="safety: only the k-sample gate study (no self-judge)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sys.path.insert(0, str(ROOT / "src"))
    from prism_persona.engines.hf import HFEngine

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from prism_persona.config import EMBEDDED_MODEL

    engine = HFEngine.load(EMBEDDED_MODEL, dtype="float32", device="cpu", batch_size=args.batch_size, quiet=True)
    result = {"model": engine.model_name, "k": args.k, "tokens": args.tokens, "seed": args.seed, "kits": {}}
    t_all = time.perf_counter()
    for kit in args.kits.split(","):
        persona = (KIT_DIR / kit / KITS[kit]["persona"]).read_text(encoding="utf-8").strip()
        per = args.style_per_domain if kit == "style" else args.per_cell_gate
        t0 = time.perf_counter()
        rows = generate(
            engine, pick_queries(kit, per), persona, args.k, args.tokens, args.seed, out / f"answers_{kit}.json"
        )
        gen_s = time.perf_counter() - t0
        judge_rows = rows if kit == "style" else pick_queries_subset(rows, args.per_cell_judge)
        res = {} if args.gate_only and kit == "safety" else judge_kit(engine, kit, judge_rows, persona, args.k)
        res["generate_seconds"] = round(gen_s, 1)
        if kit == "safety":
            res["gate"] = gate_study(engine, rows, persona, args.k, [int(s) for s in args.gate_seeds.split(",")])
        result["kits"][kit] = res
        (out / "judge_study.json").write_text(json.dumps(result, indent=1))
        logging.info("%s: %s", kit, {k: v for k, v in res.items() if k not in ("per_pair", "gate")})
        if "gate" in res:
            logging.info("gate: %s", json.dumps(res["gate"]["variants"]))
    result["wall_seconds"] = round(time.perf_counter() - t_all, 1)
    (out / "judge_study.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'judge_study.json'}")
    return 0


def pick_queries_subset(rows: list[dict], per_cell: int) -> list[dict]:
    """The first ``per_cell`` rows per (domain, intent) cell, in file order."""
    out, seen = [], {}
    for r in rows:
        cell = (r["domain"], r.get("intent", ""))
        if seen.get(cell, 0) < per_cell:
            seen[cell] = seen.get(cell, 0) + 1
            out.append(r)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
