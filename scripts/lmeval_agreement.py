"""Do `prism eval` and `lm_eval --model prism` agree on MMLU? Same questions, same prompt, per question.

    OMP_NUM_THREADS=1 python scripts/lmeval_agreement.py --mmlu tests/fixtures/mmlu_original [--artifact RUN/prism]
        [--system base] [--limit N] [--out runs/agreement]

Runs prism eval's MMLU scoring (engine.score_choices, pooled " A"/"A") and lm-eval's `prism_mmlu` task
(the shipped YAML pointed at the same questions, --apply_chat_template) with the same model and system,
then prints and writes (OUT/agreement.json) both accuracies, the share of questions with the same
prediction, the questions that differ, and the wall time of each.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mmlu", required=True, help="MMLU file/folder (any layout prism eval reads)")
    ap.add_argument("--artifact", help="PRISM artifact (needed for systems lora and prism)")
    ap.add_argument("--system", default="base", choices=["base", "lora", "prism"])
    ap.add_argument("--model", help="base model without an artifact (default: the embedded SmolLM2)")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--out", default="runs/agreement")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from prism_persona.evals.benchmarks.mmlu import LETTERS, load_mmlu

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    items = load_mmlu(args.mmlu, limit=args.limit)
    prism_preds, prism_s = prism_eval_preds(args, items, out)
    lm_preds, lm_s = lmeval_preds(args, items, out)
    same = [p == q for p, q in zip(prism_preds, lm_preds)]
    gold = [LETTERS[it.answer] for it in items]
    report = {
        "n": len(items),
        "system": args.system,
        "model": args.model or ("artifact" if args.artifact else "embedded"),
        "prism_eval_accuracy": sum(p == g for p, g in zip(prism_preds, gold)) / len(items),
        "lm_eval_accuracy": sum(p == g for p, g in zip(lm_preds, gold)) / len(items),
        "same_prediction": sum(same) / len(items),
        "differ": [
            {"item": it.item_id, "prism_eval": p, "lm_eval": q, "gold": g}
            for it, p, q, g, s in zip(items, prism_preds, lm_preds, gold, same)
            if not s
        ],
        "seconds": {"prism_eval": round(prism_s, 1), "lm_eval": round(lm_s, 1)},
        "prism_eval_predictions": "".join(prism_preds),
        "lm_eval_predictions": "".join(lm_preds),
    }
    (out / "agreement.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


def prism_eval_preds(args, items, out: Path):
    from prism_persona.evals.benchmarks.mmlu import MMLUEvaluator
    from prism_persona.evals.build import build_provider
    from prism_persona.evals.runner import EvalRunner
    from prism_persona.evals.settings import EvalConfig
    from prism_persona.evals.systems import SystemSpec

    cfg = EvalConfig(prism=args.artifact, model=args.model, device="cpu", dtype="float32", batch_size=8)
    t0 = time.perf_counter()
    runner = EvalRunner(str(out / "prism_eval"), build_provider(cfg, quiet=True))
    recs = MMLUEvaluator().responses(runner, SystemSpec(args.system), items)
    return [recs[it.item_id]["pred"] for it in items], time.perf_counter() - t0


def lmeval_preds(args, items, out: Path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from prism_persona.evals.lmeval import PrismLM
    from prism_persona.evals.lmeval_tasks import TASKS_DIR

    data = out / "mmlu_items.jsonl"
    data.write_text(
        "\n".join(
            json.dumps(
                {"question": it.question, "subject": it.subject, "choices": list(it.choices), "answer": it.answer}
            )
            for it in items
        )
        + "\n"
    )
    yaml = (TASKS_DIR / "prism_mmlu.yaml").read_text().replace("task: prism_mmlu\n", "task: prism_mmlu_local\n")
    yaml = yaml.replace(
        "dataset_path: cais/mmlu\ndataset_name: all\n",
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data.resolve()}\n",
    )
    (out / "tasks").mkdir(exist_ok=True)
    (out / "tasks" / "prism_mmlu_local.yaml").write_text(yaml)
    t0 = time.perf_counter()
    lm = PrismLM(
        artifact=args.artifact, pretrained=args.model, system=args.system, device="cpu", dtype="float32", batch_size=8
    )
    res = simple_evaluate(
        model=lm,
        tasks=["prism_mmlu_local"],
        apply_chat_template=True,
        log_samples=True,
        bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(out / "tasks"), include_defaults=False),
    )
    samples = sorted(res["samples"]["prism_mmlu_local"], key=lambda s: s["doc_id"])
    letters = "ABCD"
    preds = [letters[max(range(4), key=lambda k: s["resps"][k][0][0])] for s in samples]
    return preds, time.perf_counter() - t0


if __name__ == "__main__":
    main()
