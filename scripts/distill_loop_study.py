"""Distillation variants on one bootstrapped run: each variant's LoRA answers the held-out queries
greedily (forced on, no persona in the prompt); loops and rule-judge wins against the base model are
counted per domain. Results are cached per variant in OUT/<name>.json.

    python scripts/distill_loop_study.py RUN HELDOUT.jsonl OUT NAME='{"distill": "overrides"}' ...

e.g. after the README's "see it work" run:

    python scripts/distill_loop_study.py runs/style src/prism_persona/kits/style/heldout.jsonl runs/loops \\
        'default={}' 'kl={"loss": "kl"}' 'retain={"retain_weight": 0.5}'

The style kit's ``pirate_score`` and ``REWARDED`` are used (prism_persona.kits.style). Results of
2026-11-24: docs/method-check.md.
"""

import json
import os
import sys
import time

import torch

from prism_persona import config as C
from prism_persona.bootstrap.verify import load_labelled
from prism_persona.engines.base import SamplingParams
from prism_persona.engines.hf import HFEngine
from prism_persona.models import load_model, user_chat
from prism_persona.options import merge
from prism_persona.store import RunDir
from prism_persona.text import is_loop
from prism_persona.train.distill import run_distill


def main(run: str, heldout: str, out: str, specs: list) -> None:
    from peft import PeftModel

    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    from prism_persona.kits.style import REWARDED, pirate_score

    saved = json.load(open(f"{run}/config.json", encoding="utf-8"))
    records = load_labelled(RunDir(run))
    held = [json.loads(line) for line in open(heldout, encoding="utf-8") if line.strip()]
    model, tok = load_model(saved["model"]["model"])
    chats = [user_chat(h["query"]) for h in held]
    params = SamplingParams(max_new_tokens=saved["answers"]["max_new_tokens"])

    def answers(m):
        return [c.text for c in HFEngine(m, tok, batch_size=8, quiet=True).generate(chats, params)]

    os.makedirs(out, exist_ok=True)
    base_path = f"{out}/base.json"
    base = json.load(open(base_path)) if os.path.exists(base_path) else answers(model)
    json.dump(base, open(base_path, "w"))

    def score(texts):
        res = {}
        for dom in sorted({h["domain"] for h in held}):
            idx = [i for i, h in enumerate(held) if h["domain"] == dom]
            sign = 1 if dom in REWARDED else -1
            res[dom] = {
                "n": len(idx),
                "loops": sum(is_loop(texts[i]) for i in idx),
                "base_loops": sum(is_loop(base[i]) for i in idx),
                "wins_vs_base": sum(sign * (pirate_score(texts[i]) - pirate_score(base[i])) > 0 for i in idx),
            }
        return res

    for spec in specs:
        name, _, sets = spec.partition("=")
        path = f"{out}/{name}.json"
        if os.path.exists(path):
            print(name, open(path).read())
            continue
        cfg = C.resolve(
            "tiny",
            overrides=merge(saved, {"out": f"{out}/{name}", "quiet": True, "distill": json.loads(sets or "{}")}),
        )
        t = time.time()
        info = run_distill(RunDir(cfg.out), cfg, records, model, tok)
        lora = PeftModel.from_pretrained(model, f"{cfg.out}/distill/adapter").eval()
        texts = answers(lora)
        model = lora.unload()
        res = {
            "overrides": json.loads(sets or "{}"),
            "score": score(texts),
            "seconds": round(time.time() - t),
            "distill": {k: info.get(k) for k in ("examples", "retain_examples", "dropped_loops", "steps")},
        }
        json.dump(res, open(path, "w"), indent=1)
        print(name, json.dumps(res), flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    main(*sys.argv[1:4], sys.argv[4:])
