"""`prism run`: bootstrap + gate + distill -> the PRISM artifact in RUN/prism (resumable)."""

from __future__ import annotations

import argparse
import time

from .common import add_common, add_pipeline_options, config_from_args, resume_from_saved_config, saved_config

DESCRIPTION = """\
The whole pipeline in one run directory: the model writes expert personas for your domains, queries
and answers with and without each persona, judges them itself (bootstrap); a gate learns from the
layer-0 state of each query whether the persona helped (gate); a LoRA learns the persona behaviour
without the persona in the prompt (distill). The result, RUN/prism, is one model that routes every
query itself inside the prefill: `prism chat --prism RUN/prism`.

Rerun the same command to resume; finished stages are skipped. `prism run --out RUN` alone resumes
with the settings saved in RUN/config.json."""

EXAMPLES = """examples:
  prism run --preset tiny --domains "writing,coding,safety" --out runs/demo
  prism run --model Qwen/Qwen2.5-7B-Instruct --domains writing,coding,law --out runs/qwen
  prism run --out runs/demo          # resume
"""


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="bootstrap + gate + distill -> RUN/prism (resumable)",
                       description=DESCRIPTION, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pipeline_options(p)
    add_common(p)
    p.set_defaults(func=run)


def run_config(run_dir: str, sets: list | None = None):
    """The config saved in RUN/config.json (for single-stage commands), with --set overrides."""
    import argparse as _a

    from ..errors import PrismError

    saved = saved_config(run_dir)
    if saved is None:
        raise PrismError(f"{run_dir} has no config.json; run `prism bootstrap --out {run_dir}` first")
    ns = _a.Namespace(config=saved, out=run_dir, set=list(sets or []))
    return config_from_args(ns, need_domains=False)


def load_base(cfg):
    """(model, tokenizer) of the run's model, loaded once and shared by the stages."""
    from ..models import load_model
    from ..parallel import DataParallel

    device = DataParallel().device(cfg.model.device)  # one GPU per process under a launcher
    return load_model(cfg.model.model, cfg.model.dtype, device, cfg.model.trust_remote_code)


def train_stages(cfg, model=None, tok=None, stages=("gate", "distill"), seconds: dict | None = None) -> dict:
    """Run the gate and/or distill stages on a run's labelled data, assemble the artifact when both are
    done, and write the training report. Returns {"artifact": path or None, "report": dict}."""
    from ..artifact import assemble
    from ..bootstrap.pipeline import load_labelled
    from ..distill import run_distill
    from ..gate import run_gate
    from ..store import RunDir
    from ..training_report import write_report

    run = RunDir(cfg.out)
    records = load_labelled(run)
    seconds = dict(seconds or {})
    needs_model = any(not run.done(s) for s in stages)
    if needs_model and model is None:
        model, tok = load_base(cfg)
    if "gate" in stages:
        run_gate(run, cfg, records, model, tok)
    if "distill" in stages:
        run_distill(run, cfg, records, model, tok)
    from ..parallel import DataParallel

    if not DataParallel().is_main:  # data-parallel distillation: rank 0 assembles and reports
        return {"artifact": None, "report": None, "run": run}
    art = None
    if run.done("gate") and run.done("distill"):
        art = assemble(run, cfg)
    rep = write_report(run, records, seconds)
    return {"artifact": art, "report": rep, "run": run}


def print_result(res: dict) -> None:
    from ..bootstrap.summary import fmt_cell

    rep = res["report"]
    if rep is None:  # a non-zero rank of data-parallel distillation
        return
    g, d = rep["gate"], rep["distill"]
    held = (g.get("metrics") or {}).get("heldout") or (g.get("metrics") or {}).get("train") or {}
    t = rep["data"]["total"]
    print(f"data: {t['queries']} labelled queries, persona won {t['persona_won']}")
    if g.get("threshold") is not None:
        print(f"gate: threshold {g['threshold']:.3f} ({g['threshold_method']}); held-out accuracy "
              f"{fmt_cell(held.get('accuracy'))}, balanced {fmt_cell(held.get('balanced_accuracy'))}, AUC {fmt_cell(held.get('auc'))}")
    if d.get("steps") is not None:
        print(f"distill: {d['examples']} examples, {d['steps']} steps, loss {fmt_cell(d.get('first_loss'))} -> {fmt_cell(d.get('last_loss'))}")
    print(f"report: {res['run'].path('training_report.md')}")
    if res["artifact"]:
        art = res["artifact"]
        print(f"\nPRISM model: {art}")
        print(f"  chat:     prism chat --prism {art}")
        print(f"  generate: prism generate --prism {art} --input prompts.jsonl --output out.jsonl")


def run(args) -> int:
    import os

    from ..errors import PrismError

    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise PrismError("`prism run` runs in one process; under accelerate launch / torchrun use "
                         "`prism distill --run RUN` (data-parallel distillation) after `prism run` has "
                         "finished the bootstrap and the gate")
    resume_from_saved_config(args)
    cfg = config_from_args(args)

    from ..bootstrap.pipeline import run_bootstrap
    from ..store import RunDir

    seconds: dict = {}
    model = tok = None
    engine = None
    run_dir = RunDir(cfg.out)
    todo = [s for s in ("bootstrap", "gate", "distill") if not run_dir.done(s)]
    if todo and cfg.engine.engine == "hf":
        from ..engines.hf import HFEngine
        from ..models import resolve_model

        t0 = time.perf_counter()
        model, tok = load_base(cfg)
        seconds["load_model"] = round(time.perf_counter() - t0, 2)
        engine = HFEngine(model, tok, batch_size=cfg.model.batch_size, quiet=cfg.quiet,
                          model_name=resolve_model(cfg.model.model).display)
    t0 = time.perf_counter()
    run_bootstrap(cfg, engine=engine)
    if "bootstrap" in todo:
        seconds["bootstrap"] = round(time.perf_counter() - t0, 2)
    res = train_stages(cfg, model, tok, seconds=seconds)
    print_result(res)
    return 0
