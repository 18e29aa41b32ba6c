"""The whole PRISM method in one resumable call: :func:`run_pipeline`.

Stages, each a set of files in the run directory ``cfg.out``:

1-4. bootstrap (:func:`run_bootstrap`): personas -> queries -> answers -> swapped verdicts -> summary.
5.   gate (:func:`prism_persona.train.gate.run_gate`): layer-0 features of each query -> ``RUN/gate/``.
6.   distill (:func:`prism_persona.train.distill.run_distill`): persona-conditioned teacher -> ``RUN/distill/adapter``.
7.   assemble (:func:`prism_persona.gated.artifact.assemble`) -> ``RUN/prism``, and the training report.

Stages 1-6 (and any registered with :func:`prism_persona.stages.register`) come from the stage
registry: this module loops it, calling each stage's ``step(ctx)`` with a
:class:`prism_persona.stages.StageContext`; it reads no stage's settings block itself.

Every stage follows one protocol: skip when its ``<stage>.done.json`` exists; otherwise check the
settings it saved against the current ones (a run directory made with different data-affecting
settings is refused with a one-line error before any model loads), do the work (appending records as
chunks finish, so a killed run continues where it stopped), then mark itself done. The model is loaded
once, only if some stage still has work, and shared by every stage.

``prism run`` / ``bootstrap`` / ``gate`` / ``distill`` are thin wrappers over these functions.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from typing import Optional

from .. import config as C
from .. import stages as S
from ..bootstrap.common import Lazy, counters, stage_settings, token_stats
from ..bootstrap.personas import run_domains
from ..bootstrap.queries import target
from ..bootstrap.summary import build_summary, format_data_report, format_summary
from ..bootstrap.verify import abstain_margin, build_judge, check_judge, load_labelled
from ..errors import PrismError
from ..how_to_run import check_how_to_run
from ..stages import StageContext, bootstrap_stages, get_stage, markers, stage_names, training_stages, with_dependents
from ..store import JsonlStore, RunDir, RunLock, StageSwap, remove_entry

log = logging.getLogger(__name__)


def peak_rss_mb() -> Optional[float]:
    """This process's peak resident memory so far in MB (``ru_maxrss``), None where unavailable."""
    try:
        import resource
        import sys

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(kb / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)  # bytes on macOS
    except (ImportError, OSError):
        return None


def release_free_heap() -> bool:
    """Give the memory the C allocator holds free back to the OS (glibc's ``malloc_trim(0)``); False
    where the C library has none (not glibc). Called once, after distillation and before the held-out
    check: distillation's logits and gradients (a few to 32 MB each) grow glibc's heap, which it keeps
    resident when they are freed (~0.29 GB on the first command, 1.29 GB of RSS -> 1.0 GB after the
    trim), and the check's caches, larger than glibc's mmap threshold, are mapped on top of it rather
    than served from it (the command's peak, 1.6 GB). Nothing is live in that memory: no output changes."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


def check_run(cfg: C.RunConfig, run: RunDir) -> None:
    """Refuse early (before loading a model, and before ``config.json`` is rewritten) if ``run`` holds
    records or trained stages made with other settings: the saved config always describes what ran."""
    for stage in S.STAGES:
        for store in stage.stores:
            run.check_settings(store, json.loads(json.dumps(stage_settings(cfg, stage.name), default=str)))
    check_trained(cfg, run, training_stages())


def check_trained(cfg: C.RunConfig, run: RunDir, stages) -> None:
    """A finished gate / distill stage is skipped on a rerun, so settings that differ from the ones it
    was trained with are refused (with a --redo hint) instead of being silently ignored."""
    done = [s for s in stages if run.done(s)]
    if not done:
        return
    for stage in done:
        settings = stage_settings(cfg, stage)
        run.check_settings(stage, json.loads(json.dumps(settings, default=str)))


ARTIFACT_STAGES = ("gate", "distill")
"""The training stages the gated artifact is assembled from (a registered stage adds files, not parts)."""


def preflight(cfg: C.RunConfig, engine, judge) -> None:
    """One-line errors for a bad config, model, judge or persona file, before anything runs."""
    C.validate(cfg)
    for stage in S.STAGES:  # each stage's own one-line errors (domains, persona / queries / base files)
        if stage.check:
            stage.function("check")(cfg)
    if cfg.check.queries:
        check_heldout_file(cfg)
    if engine is None:
        from ..engines import check_engine

        check_engine(cfg)


def check_heldout_file(cfg: C.RunConfig) -> None:
    """One-line errors for a ``--heldout`` file that cannot be read or names a domain the run lacks."""
    from .check import load_heldout

    items = load_heldout(
        cfg.check.queries, cfg.check.rewarded, rewarded_flag="check.rewarded", per_domain=cfg.check.per_domain
    )
    domains = run_domains(cfg)
    unknown = sorted({q.domain for q in items} - set(domains))
    if unknown:
        raise PrismError(
            f"--heldout {cfg.check.queries}: domain(s) {', '.join(unknown)} are not among the run's "
            f"domains ({', '.join(domains)})"
        )


def run_heldout_check(cfg: C.RunConfig, run: RunDir, model=None, tok=None) -> dict:
    """``prism check`` of the run's artifact on ``cfg.check.queries`` with the run's judge, into
    ``RUN/check`` (resumable; redone after ``--redo gate|distill``). An already loaded base model
    (``model``, ``tok``) is reused, and modified: the artifact's adapter is installed into it."""
    from ..bootstrap.personas import persona_files
    from ..gated.model import GatedModel
    from .check import run_check

    m = cfg.model
    gated = GatedModel.from_pretrained(
        run.path("prism"),
        device=m.device,
        dtype=m.dtype,
        batch_size=m.batch_size,
        base=(model, tok) if model is not None else None,
        trust_remote_code=m.trust_remote_code,
    )
    return run_check(
        run.path("prism"),
        cfg.check,
        cfg.judge,
        run.path("check"),
        persona_files=persona_files(cfg),
        batch_size=m.batch_size,
        quiet=cfg.quiet,
        gated=gated,
    )


def save_config(run: RunDir, cfg: C.RunConfig) -> None:
    """``RUN/config.json`` := ``cfg``. Called only by a stage that is about to do work with ``cfg``, so
    the saved config always describes what was run (a rerun of a finished run rewrites nothing)."""
    run.write_json("config.json", json.loads(C.dump(cfg)))


def bootstrap_has_work(run: RunDir, cfg: C.RunConfig) -> bool:
    """False for a finished bootstrap that the current settings do not extend (same domains, same
    number of queries per persona): then nothing runs and ``config.json`` is left as it is."""
    saved = run.read_json("config.json")
    if not run.done("bootstrap") or not isinstance(saved, dict):
        return True
    same_domains = saved.get("persona", {}).get("domains") == run_domains(cfg)
    return not same_domains or saved.get("queries", {}).get("queries_per_persona") != target(cfg)


def run_bootstrap(cfg: C.RunConfig, engine=None, judge=None, redo_stage: Optional[str] = None) -> dict:
    """Run or resume the bootstrap in ``cfg.out``; write ``summary.json`` / ``summary.md``; return the summary.

    ``engine`` defaults to ``engines.make_engine(cfg)`` and ``judge`` to ``judges.make_judge(cfg, engine)``;
    both are built only when a stage needs them. The run directory is locked (:class:`RunLock`) while
    this runs. A ``module:function`` judge is imported only after the settings check, and only when the
    verdicts still have work to do. ``redo_stage`` is forgotten (:func:`redo`) only once every setting
    is checked and the lock is held.
    """
    preflight(cfg, engine, judge)
    with RunLock(cfg.out):
        check_redo(cfg, redo_stage, judge)
        with redo_guard(cfg, redo_stage):
            return _run_bootstrap(cfg, engine, judge)


def check_redo(cfg: C.RunConfig, stage: Optional[str], judge=None) -> None:
    """Before ``--redo STAGE`` sets anything aside: the judge it will need resolves and the labelled data
    the training stages it redoes read is readable (one-line errors; the run is not touched)."""
    if not stage:
        return
    stages = redo_stages(stage)
    if judge is None and any(get_stage(s).stores for s in stages):
        check_judge(cfg)
    if not any(get_stage(s).stores for s in stages):  # only training stages: their input must be readable
        labelled(RunDir(cfg.out), cfg)


def labelled(run: RunDir, cfg: C.RunConfig) -> list[dict]:
    """The run's labelled pairs (:func:`load_labelled`); none at all is one line (a stage trained on
    nothing would replace a trained gate or LoRA with an untrained one)."""
    records = load_labelled(run, abstain_margin(cfg))
    if not records:
        raise PrismError(
            f"{run.path('verdicts.jsonl')} holds no judged pairs to train on; run `prism bootstrap --out "
            f"{run.root}` (with --redo verdicts to judge again) first"
        )
    return records


_SWAPPING: set[str] = set()  # run dirs with a redo in progress in this process (nested calls join it)
REWRITTEN = ("config.json", "bootstrap_sessions.jsonl", "summary.json", "summary.md")
"""Files a command may rewrite whatever stage it redoes (copied aside with the redone ones)."""


@contextlib.contextmanager
def redo_guard(cfg: C.RunConfig, stage: Optional[str]):
    """``with redo_guard(cfg, "--redo" stage):`` the command, all or nothing (:class:`StageSwap`): the
    files ``--redo STAGE`` replaces are set aside (with ``config.json`` and the other files every command
    rewrites) and dropped only when the block succeeds; an error in the block restores them, so a failed
    redo leaves the run byte-identical. Ctrl-C / kill leave the swap pending: the next command on the
    run carries it on. Called with the run locked."""
    from ..gated.artifact import FINGERPRINT_FILE

    run = RunDir(cfg.out)
    swap = StageSwap(run)
    key = str(run.root.resolve())
    if key in _SWAPPING or not (stage or swap.pending()):
        yield
        return
    if swap.pending():
        log.warning("%s: carrying on an interrupted --redo (the files it replaces are in %s)", run.root, swap.dir)
    if stage:
        redo_stages(stage)
        log.info("redo %s: setting aside %s until it succeeds", stage, ", ".join(redo_names(stage)))
    swap.begin(redo_names(stage) if stage else (), REWRITTEN + (FINGERPRINT_FILE,))
    _SWAPPING.add(key)
    try:
        yield
    except (Exception, SystemExit):
        swap.rollback()
        log.info("%s: the command failed; the run is restored as it was before it", run.root)
        raise
    finally:
        _SWAPPING.discard(key)
    swap.commit()


def _run_bootstrap(cfg: C.RunConfig, engine, judge) -> dict:
    t0 = time.perf_counter()
    baseline = counters([engine] + (list(judge.engines) if judge is not None else []))
    run = RunDir(cfg.out)
    check_run(cfg, run)
    if not run.done("bootstrap") and judge is None:
        check_judge(cfg)
    if bootstrap_has_work(run, cfg):
        save_config(run, cfg)

    def _make_engine():
        from ..engines import make_engine

        return make_engine(cfg)

    get_engine = Lazy(_make_engine, engine)
    get_judge = Lazy(lambda: build_judge(cfg, get_engine), judge)
    ctx = StageContext(cfg, run, engine=get_engine, judge=get_judge, quiet=cfg.quiet)
    try:
        for name in bootstrap_stages():  # each stage publishes what later ones read in ctx.outputs
            stage = get_stage(name)
            stage.function("step")(ctx.for_stage(stage))
    finally:  # also on Ctrl-C: close what was built here and keep this invocation's token counts
        built = [get_engine.built] + (list(get_judge.built.engines) if get_judge.built is not None else [])
        tokens = record_tokens(run, token_stats(built, baseline), time.perf_counter() - t0)
        if judge is None and get_judge.built is not None:
            get_judge.built.close()
        if engine is None and get_engine.built is not None:
            get_engine.built.close()
    out = ctx.outputs
    summary = build_summary(
        out["domains"],
        out["verdicts"],
        out["answers"],
        personas=out["persona_counts"],
        queries=out["collected"],
        target=out["target"],
        tokens=tokens,
        judge=getattr(get_judge.built, "name", out["judge"]),
        mode=_judge_mode(get_judge.built, out["verdicts"]),
        model=cfg.model.model,
        wall_seconds=time.perf_counter() - t0,
        run=str(run.root),
        query_stats=out["query_stats"],
        abstain_margin=out["abstain_margin"],
    )
    run.write_json("summary.json", summary)
    run.path("summary.md").write_text(format_summary(summary), encoding="utf-8")
    run.mark_done("bootstrap", {"pairs": len(out["verdicts"]), "labelled_positive": summary["total"]["wins"]})
    return summary


def record_tokens(run: RunDir, stats: dict, wall: float) -> dict:
    """Append this invocation's generation counters to ``bootstrap_sessions.jsonl`` (when it generated
    anything) and return ``{"this_invocation": ..., "total": ...}`` summed over all invocations."""
    ledger = JsonlStore(run.path("bootstrap_sessions.jsonl"))
    if stats["tokens_generated"] or stats["generate_seconds"]:
        ledger.append(
            {
                "key": f"{time.time():.6f}-{os.getpid()}",
                "tokens_generated": stats["tokens_generated"],
                "generate_seconds": stats["generate_seconds"],
                "wall_seconds": round(wall, 2),
            }
        )
    toks = sum(r["tokens_generated"] for r in ledger)
    secs = sum(r["generate_seconds"] for r in ledger)
    total = {
        "tokens_generated": toks,
        "generate_seconds": round(secs, 3),
        "tokens_per_s": round(toks / secs, 2) if secs > 0 else None,
        "invocations": len(ledger),
    }
    return {"this_invocation": stats, "total": total}


def _judge_mode(judge, verdicts: list[dict]) -> Optional[str]:
    if judge is not None:
        return judge.mode
    modes = sorted({v["mode"] for v in verdicts})
    return ",".join(modes) or None


# --- stages 5-7 -------------------------------------------------------------------------------------


def redo_stages(stage: str) -> list[str]:
    """``stage`` and every stage whose records depend on it, in pipeline order."""
    if stage not in stage_names():
        raise PrismError(f"--redo takes one of: {', '.join(stage_names())}; got '{stage}'")
    return with_dependents(stage)


def redo_names(stage: str) -> list[str]:
    """What redoing ``stage`` replaces: the done markers first, the stage files and directories, the
    assembled artifact, its check and the training report, then the saved stage settings."""
    stages = redo_stages(stage)
    names = [n for s in stages for n in get_stage(s).files]
    names.sort(key=lambda n: not n.endswith(".done.json"))  # markers first
    return names + ["prism", "check", "training_report.json", "training_report.md"] + [f"{s}.meta.json" for s in stages]


def redo(run_dir, stage: str) -> list[str]:
    """Forget ``stage`` (and what depends on it) so the next run redoes it with the current settings.

    Removes, in this order: the done markers, the stage files and directories, the assembled artifact
    and training report, then the saved stage settings (last: a run killed half-way through is then
    refused, with a hint to pass --redo again, rather than resumed from half-removed state).
    Returns the names removed.
    """
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    removed = [name for name in redo_names(stage) if remove_entry(run.path(name))]
    log.info("redo %s: removed %s", stage, ", ".join(removed) or "nothing (the stage had not run)")
    return removed


def run_config(run_dir: str | os.PathLike, overrides: Optional[dict] = None) -> C.RunConfig:
    """The settings saved in ``RUN/config.json`` (what the run was made with), with ``overrides``."""
    saved = os.path.join(os.fspath(run_dir), "config.json")
    if not os.path.isfile(saved):
        raise PrismError(f"{run_dir} has no config.json; run `prism bootstrap --out {run_dir}` first")
    cfg = C.resolve(file=saved, overrides={**(overrides or {}), "out": os.fspath(run_dir)})
    check_how_to_run(cfg, C.read_config_file(saved), overrides or {}, saved, os.fspath(run_dir))
    return cfg


def load_base(cfg: C.RunConfig):
    """(model, tokenizer) of the run's model, loaded once and shared by the stages (one GPU per
    process under a data-parallel launcher)."""
    from ..models import load_model
    from .parallel import DataParallel

    device = DataParallel().device(cfg.model.device)
    return load_model(cfg.model.model, cfg.model.dtype, device, cfg.model.trust_remote_code)


def train_stages(
    cfg: C.RunConfig,
    model=None,
    tok=None,
    stages: Optional[tuple[str, ...]] = None,
    seconds: Optional[dict] = None,
    redo_stage: Optional[str] = None,
    memory: Optional[dict] = None,
) -> dict:
    """Run the training stages ``stages`` (default: all of them, in registry order) on a run's labelled
    data, assemble the artifact when the gate and distillation are done, and write the training report.
    Returns ``{"artifact": path or None, "report": dict, "run": RunDir}``."""
    from .parallel import DataParallel

    main = DataParallel().is_main  # data-parallel distillation: every rank trains, rank 0 writes
    with RunLock(cfg.out) if main else contextlib.nullcontext():
        if main:
            check_redo(cfg, redo_stage)
        with redo_guard(cfg, redo_stage) if main else contextlib.nullcontext():
            return _train_stages(
                cfg, model, tok, training_stages() if stages is None else stages, seconds, main, memory
            )


def _train_stages(cfg: C.RunConfig, model, tok, stages, seconds, main, memory=None) -> dict:
    from ..gated.artifact import assemble
    from .report import write_report

    run = RunDir(cfg.out)
    check_trained(cfg, run, stages)
    todo = any(not run.done(s) for s in stages)
    records = labelled(run, cfg) if todo else load_labelled(run, abstain_margin(cfg))
    seconds = dict(seconds or {})
    memory = {} if memory is None else memory
    if todo and model is None:
        model, tok = load_base(cfg)
        memory["load_model"] = peak_rss_mb()
    ctx = StageContext(cfg, run, model=model, tokenizer=tok, records=records, quiet=cfg.quiet)
    prepare_stages(ctx, stages)  # settings checked against the model before any write
    if todo and main:
        save_config(run, cfg)
    if model is not None and main:
        from ..gated.artifact import FINGERPRINT_FILE, base_fingerprint

        run.write_json(FINGERPRINT_FILE, base_fingerprint(model))
    for name in training_stages():  # the registry skips a finished stage (check_trained checked its settings)
        if name not in stages:
            continue
        if run.done(name):
            log.info("%s: already done, skipping (pass --redo %s to train it again)", name, name)
            continue
        stage_ctx = ctx.for_stage(get_stage(name))
        run.check_settings(name, stage_ctx.settings)  # a half-done stage's files were made with these settings
        stage_ctx.stage.function("step")(stage_ctx)  # the step trains and writes <name>.done.json
        memory[name] = peak_rss_mb()
    if not main:  # data-parallel distillation: rank 0 assembles and reports
        return {"artifact": None, "report": None, "run": run}
    art = assemble(run, cfg) if all(run.done(s) for s in ARTIFACT_STAGES) else None
    rep = write_report(run, records, seconds, memory)
    return {"artifact": art, "report": rep, "run": run}


def prepare_stages(ctx: StageContext, names) -> None:
    """Call the ``prepare(ctx)`` hook of each training stage in ``names`` that is not done yet (the
    shared model is loaded): settings checked against the model before anything is written."""
    for name in training_stages():
        stage = get_stage(name)
        if name in names and stage.prepare and not ctx.run.done(name):
            stage.function("prepare")(ctx.for_stage(stage))


def run_pipeline(cfg: C.RunConfig, engine=None, judge=None, redo_stage: Optional[str] = None) -> dict:
    """Run or resume every stage of the method in ``cfg.out`` and return
    ``{"summary", "artifact", "report", "run"}``; ``RUN/prism`` is the gated model.

    ``engine`` / ``judge`` default to the ones ``cfg`` asks for; with an engine that shares the caller's
    model (``EngineSpec.shares_model``) the model is loaded once and shared by the bootstrap, the gate and
    distillation.
    """
    from .parallel import DataParallel

    if DataParallel().world > 1:
        raise PrismError(
            "the pipeline runs in one process; under accelerate launch / torchrun use "
            "`prism distill --run RUN` (data-parallel distillation) after the bootstrap and the gate"
        )
    preflight(cfg, engine, judge)
    with RunLock(cfg.out):
        check_redo(cfg, redo_stage, judge)
        with redo_guard(cfg, redo_stage):
            return _run_pipeline(cfg, engine, judge)


def _run_pipeline(cfg: C.RunConfig, engine, judge) -> dict:
    seconds: dict = {}
    memory: dict = {}  # peak RSS (MB) of the process after each stage run here
    model = tok = None
    run = RunDir(cfg.out)
    check_run(cfg, run)  # before the model loads
    todo = [m for m in markers() if not run.done(m)]
    if judge is None and (todo or cfg.check.queries):  # a judge that cannot load: before the model loads
        check_judge(cfg)
    from ..engines import engine_spec, make_engine

    if todo and engine is None and engine_spec(cfg.engine.engine).shares_model:  # the model loads once, shared
        t0 = time.perf_counter()
        model, tok = load_base(cfg)
        seconds["load_model"] = round(time.perf_counter() - t0, 2)
        memory["load_model"] = peak_rss_mb()
        # settings checked against the model (distillation's LoRA targets) before the bootstrap
        prepare_stages(StageContext(cfg, run, model=model, tokenizer=tok, quiet=cfg.quiet), training_stages())
        engine = make_engine(cfg, model, tok)
    t0 = time.perf_counter()
    summary = run_bootstrap(cfg, engine=engine, judge=judge)
    if summary.get("data_report"):  # `prism bootstrap` prints it with the summary
        report = "\n".join(format_data_report(summary["data_report"]))
        log.info("bootstrap data report (also in %s):\n%s", run.path("summary.md"), report)
    if "bootstrap" in todo:
        seconds["bootstrap"] = round(time.perf_counter() - t0, 2)
        memory["bootstrap"] = peak_rss_mb()
    res = train_stages(cfg, model, tok, seconds=seconds, memory=memory)
    if cfg.check.queries and res["artifact"]:
        from .report import write_report

        t0 = time.perf_counter()
        release_free_heap()  # distillation's freed heap, before the check maps its caches on top of it
        run_heldout_check(cfg, run, model, tok)
        seconds["check"] = round(time.perf_counter() - t0, 2)
        memory["check"] = peak_rss_mb()
        res["report"] = write_report(run, load_labelled(run, abstain_margin(cfg)), seconds, memory)
    return {"summary": summary, **res}
