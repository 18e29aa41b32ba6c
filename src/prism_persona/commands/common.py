"""Options shared by several commands, and turning parsed flags into a resolved RunConfig.

Only the standard library is imported here (``prism --help`` must stay fast).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from .. import engines as _engine_registry  # noqa: F401  (loading it fills the --engine choices; no heavy imports)

log = logging.getLogger("prism_persona")


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars; warnings and the final summary only")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def prism_optional(p) -> None:
    """--prism becomes optional (`prism generate` and `prism chat`): a server engine can run a base model alone."""
    for action in p._actions:
        if "--prism" in action.option_strings:
            action.required = False
            action.help = "PRISM artifact directory (RUN/prism); needed with --engine hf (the default)"


def add_pipeline_options(p: argparse.ArgumentParser, check: bool = True) -> None:
    """Everything `prism bootstrap` and `prism run` share: the flags of the RunConfig fields that name
    one (type, choices, help and default from config.py), plus the flags that are not one setting.
    ``check=False`` leaves out the held-out check's flags (`prism bootstrap` trains nothing to check)."""
    from ..config import G_DATA, G_ENGINE, G_RUN, RunConfig, run_set_only
    from ..options import add_flags
    from ..stages import stage_names

    skip = run_set_only() + (() if check else ("check",))  # --set engine.vllm_args=[...] in a run
    groups = add_flags(p, RunConfig, flagged_only=True, skip=skip)
    g = groups[G_RUN]
    g.add_argument("--config", help="JSON or TOML config file (see `prism config --show`)")
    g.add_argument(
        "--redo",
        metavar="STAGE",
        choices=stage_names(),
        help="re-run a finished stage (and the stages that depend on it) with the current settings",
    )
    g = groups[G_DATA]
    g.add_argument("--domains", help='comma-separated domain names, e.g. "writing,coding,safety"')
    g.add_argument(
        "--persona-file",
        action="append",
        default=[],
        metavar="DOMAIN=PATH",
        help="use this text file verbatim as DOMAIN's persona (repeatable)",
    )
    groups["judge"].add_argument(
        "--trust-judge",
        action="store_true",
        help="import the module:function judge named in a config file or RUN/config.json (it runs Python code; "
        "a judge named with --judge on the command line needs no confirmation)",
    )
    groups[G_ENGINE].add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any setting by dotted key, e.g. --set distill.r=8 (repeatable; VALUE is JSON or text)",
    )


def _put(d: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def overrides_from_args(args: argparse.Namespace) -> dict:
    """The settings typed on the command line as a nested dict (what config.resolve layers on top)."""
    from ..bootstrap.common import persona_files_from_flags
    from ..config import RunConfig
    from ..errors import PrismError
    from ..options import flag_values

    given = vars(args)
    o = flag_values(RunConfig, args, flagged_only=True)
    if given.get("quiet"):
        o["quiet"] = True
    if given.get("domains") is not None:
        doms = [d.strip() for d in given["domains"].split(",")]
        if not any(doms):
            raise PrismError("--domains is empty; give comma-separated names, e.g. --domains writing,coding")
        _put(o, "persona.domains", doms)
    files = persona_files_from_flags(given.get("persona_file") or [])
    if files:
        _put(o, "persona.persona_files", files)
    for section, key in (("queries", "queries_file"), ("check", "queries")):
        if o.get(section, {}).get(key):
            o[section][key] = str(Path(o[section][key]).expanduser().resolve())
    for item in given.get("set") or []:
        if "=" not in item:
            raise PrismError(f"--set wants KEY=VALUE, got '{item}'")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        _put(o, key.strip(), value)
    from ..config import QUERIES_FILE_SETTINGS, is_queries_file

    for key in QUERIES_FILE_SETTINGS:  # --set gate.base_queries=PATH, --set gate.ood_contrast=PATH
        if is_queries_file(o.get("gate", {}).get(key)):
            o["gate"][key] = str(Path(o["gate"][key]).expanduser().resolve())
    return o


def saved_config(out: str | None) -> str | None:
    """``RUN/config.json`` of a run directory, if it has one (what a resumed run starts from)."""
    saved = Path(out or "runs/prism").expanduser() / "config.json"
    return str(saved) if saved.is_file() else None


def resume_from_saved_config(args: argparse.Namespace) -> None:
    """Without ``--config``, a rerun starts from the run's saved config (flags still override it)."""
    if not args.config:
        args.config = saved_config(args.out)


def config_from_args(args: argparse.Namespace, need_domains: bool = True):
    """defaults < preset < --example kit < --config file < flags; a saved RUN/config.json is reused when
    resuming (what was run: how to run here comes from the flags, :func:`how_to_run.check_how_to_run`)."""
    from ..bootstrap.personas import run_domains
    from ..config import read_config_file, resolve
    from ..errors import PrismError
    from ..how_to_run import check_how_to_run

    overrides = overrides_from_args(args)
    cfg_file = vars(args).get("config")
    file_data = read_config_file(cfg_file) if cfg_file else {}
    typed_kit, saved_kit = overrides.get("example"), file_data.get("example")
    if typed_kit and saved_kit and typed_kit != saved_kit:
        raise PrismError(f"{cfg_file} was made with --example {saved_kit}; use another --out for --example {typed_kit}")
    kit = example_from(typed_kit or saved_kit or "")
    cfg = resolve(file=cfg_file, overrides=overrides, example=kit)
    if need_domains and not run_domains(cfg):
        raise PrismError(
            'no domains given; use --domains "writing,coding,safety", --example safety or a config file with persona.domains'
        )
    check_judge_source(cfg, overrides, cfg_file, bool(vars(args).get("trust_judge")))
    if cfg_file:
        resuming = cfg_file == saved_config(cfg.out)
        typed = _kit_files_as_typed(kit, file_data, overrides)
        check_how_to_run(cfg, file_data, typed, cfg_file, cfg.out if resuming else "")
    return cfg


def example_from(name: str) -> dict:
    """The settings of the example kit ``name`` (``{}`` for none; a one-line error for an unknown one)."""
    if not name:
        return {}
    from ..kits import example_settings

    return example_settings(name)


def _kit_files_as_typed(kit: dict, file_data: dict, overrides: dict) -> dict:
    """The kit's own files (package data of this library) count as typed where the config file names
    exactly them: a resumed ``--example`` run reads them again, any other file still needs its flag."""
    from ..how_to_run import LOCAL_FILES, _dotted, _put_dotted
    from ..options import merge

    same: dict = {}
    for key in LOCAL_FILES:
        value = _dotted(kit, key)
        if value is not None and _dotted(file_data, key) == value:
            _put_dotted(same, key, value)
    return merge(same, overrides)


def check_judge_source(cfg, overrides: dict, cfg_file: str | None, confirmed: bool) -> None:
    """A ``module:function`` judge runs Python code. It is imported when the user typed it on this
    command line (``--judge`` / ``--set judge.judge=``) or confirms with ``--trust-judge``; a judge that
    only a file names (a received ``RUN/config.json`` or ``--config`` file) is refused with one line,
    also when the bootstrap is done (the held-out check and ``--redo verdicts`` would import it)."""
    from ..bootstrap.verify import judge_spec
    from ..errors import PrismError
    from ..judges import is_callable_spec
    from ..kits import builtin_judges

    spec = judge_spec(cfg).strip()
    typed = "judge" in (overrides.get("judge") or {})
    builtin = spec in builtin_judges()  # an example kit's rule judge: library code, not a file's
    if typed or confirmed or builtin or not is_callable_spec(spec) or Path(spec).exists():
        return
    raise PrismError(
        f"the judge '{spec}' named in {cfg_file} would run Python code; name it on the command "
        f"line (--judge {spec}) or pass --trust-judge to import it"
    )


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
        print(
            f"gate: threshold {g['threshold']:.3f} ({g['threshold_method']}); held-out accuracy "
            f"{fmt_cell(held.get('accuracy'))}, balanced {fmt_cell(held.get('balanced_accuracy'))}, AUC {fmt_cell(held.get('auc'))}"
        )
    if d.get("steps") is not None:
        print(
            f"distill: {d['examples']} examples, {d['steps']} steps, loss {fmt_cell(d.get('first_loss'))} -> {fmt_cell(d.get('last_loss'))}"
        )
    chk = rep.get("heldout_check")
    if chk:
        o, gr = chk.get("overall") or {}, chk.get("gate_vs_expected_route") or {}
        print(
            f"held-out check ({chk.get('heldout')}): gate AUC {fmt_cell(gr.get('auc'))}, transfer "
            f"{fmt_cell(o.get('transfer_ratio'))}, base identity {fmt_cell(o.get('base_identity'))} of "
            f"{o.get('unrouted')} unrouted; details in {res['run'].path('check') / 'check.md'}"
        )
    print(f"report: {res['run'].path('training_report.md')}")
    if res["artifact"]:
        art = res["artifact"]
        print(f"\nPRISM model: {art}")
        print(f"  chat:     prism chat --prism {art}")
        print(f"  generate: prism generate --prism {art} --input prompts.jsonl --output out.jsonl")
    if rep.get("statement"):
        print(f"\n{rep['statement']}")


def add_stage_parser(sub, stage: str, help: str, description: str, example_set: str) -> None:
    """The parser of a command that runs one training stage of a run (`prism gate`, `prism distill`)."""
    p = sub.add_parser(stage, help=help, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory made by `prism bootstrap` / `prism run`")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a setting, e.g. --set {example_set} (repeatable)",
    )
    p.add_argument("--redo", action="store_true", help=f"run the {stage} stage again with the current settings")
    # the files of this machine a run may have been made with (a saved RUN/config.json never names them for you)
    p.add_argument("--queries-file", metavar="PATH", help="the training-queries file the run was made with")
    p.add_argument("--heldout", metavar="PATH", help="the held-out file the run was made with")
    p.add_argument(
        "--persona-file",
        action="append",
        default=[],
        metavar="DOMAIN=PATH",
        help="a persona file outside the run the run was made with (repeatable)",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        default=None,
        help="run the model repository's own modelling code (a run's saved config never turns it on)",
    )
    add_common(p)
    p.set_defaults(func=lambda args: run_stage(args, stage))


def run_stage(args: argparse.Namespace, stage: str) -> int:
    """Run one training stage of ``args.run`` (again with ``--redo``) and print the result."""
    from ..train.pipeline import run_config, train_stages

    cfg = run_config(args.run, overrides_from_args(args))
    print_result(train_stages(cfg, stages=(stage,), redo_stage=stage if args.redo else None))
    return 0
