"""Options shared by several commands, and turning parsed flags into a resolved RunConfig.

Only the standard library is imported here (``prism --help`` must stay fast).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger("prism_persona")


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars; warnings and the final summary only")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="embedded default (smollm2-135m-instruct), a Hugging Face id, a local HF dir or a .gguf file")
    g.add_argument("--dtype", help="auto | float32 | bfloat16 | float16")
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--batch-size", type=int, help="rows per generation batch")


def add_engine_options(g) -> None:
    """--engine / --base-url / --concurrency / --vllm-python (a parser or an argument group)."""
    g.add_argument("--engine", choices=["hf", "vllm", "openai"],
                   help="hf (in-process, default), vllm (PRISM starts a vLLM server; see scripts/setup_vllm.sh) "
                        "or openai (any OpenAI-compatible server)")
    g.add_argument("--base-url", help="a running server, e.g. http://127.0.0.1:8000/v1: needed for --engine openai; "
                                      "with --engine vllm, attach to it instead of starting one")
    g.add_argument("--concurrency", type=int, help="requests in flight at once for --engine openai/vllm")
    g.add_argument("--vllm-python", help="Python that runs the vLLM server (default: the venv of scripts/setup_vllm.sh)")


def add_pipeline_options(p: argparse.ArgumentParser) -> None:
    """Everything `prism bootstrap` and `prism run` share."""
    add_model_options(p)
    g = p.add_argument_group("run")
    g.add_argument("--config", help="JSON or TOML config file (see `prism config --show`)")
    g.add_argument("--preset", help="default (paper settings, GPU) or tiny (2-core CPU, ~10 min)")
    g.add_argument("--out", help="run directory (default runs/prism); rerun the same command to resume")
    g.add_argument("--seed", type=int, help="seed for sampling, splits and initialisation")
    g.add_argument("--redo", metavar="STAGE", choices=["personas", "queries", "answers", "verdicts", "gate", "distill"],
                   help="re-run a finished stage (and the stages that depend on it) with the current settings")
    g = p.add_argument_group("personas and data")
    g.add_argument("--domains", help='comma-separated domain names, e.g. "writing,coding,safety"')
    g.add_argument("--persona-file", action="append", default=[], metavar="DOMAIN=PATH",
                   help="use this text file verbatim as DOMAIN's persona (repeatable)")
    g.add_argument("--placement", choices=["system", "user"], help="persona as system message (default) or prepended to the user message")
    g.add_argument("--persona-length", choices=["min", "short", "long"], help="persona variant that drives queries, answers and distillation")
    g.add_argument("--queries-per-persona", type=int, help="unique queries to collect per persona")
    g.add_argument("--queries-file", metavar="PATH",
                   help="your own training queries (.jsonl/.json/.csv with domain and query) instead of self-generated ones")
    g.add_argument("--answer-tokens", type=int, help="max new tokens of each answer")
    g = p.add_argument_group("judge")
    g.add_argument("--judge", help="self (default), a model id/path, or a Python callable module:function")
    g.add_argument("--judge-mode", choices=["auto", "logprob", "text"], help="read verdicts from log-probs or parse text")
    g.add_argument("--trust-judge", action="store_true",
                   help="import the module:function judge named in a config file or RUN/config.json (it runs "
                        "Python code; a judge named with --judge on the command line needs no confirmation)")
    g = p.add_argument_group("engine (where generation runs)")
    add_engine_options(g)
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any setting by dotted key, e.g. --set distill.r=8 (repeatable; VALUE is JSON or text)")


def _put(d: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def overrides_from_args(args: argparse.Namespace) -> dict:
    from ..errors import PrismError

    o: dict = {}
    table = {
        "model": "model.model", "dtype": "model.dtype", "device": "model.device", "batch_size": "model.batch_size",
        "preset": "preset", "out": "out", "seed": "seed",
        "placement": "persona.placement", "persona_length": "persona.use_length",
        "queries_per_persona": "queries.queries_per_persona", "answer_tokens": "answers.max_new_tokens",
        "judge": "judge.judge", "judge_mode": "judge.mode",
        "engine": "engine.engine", "base_url": "engine.base_url", "concurrency": "engine.concurrency",
        "vllm_python": "engine.vllm_python",
    }
    for attr, key in table.items():
        value = getattr(args, attr, None)
        if value is not None:
            _put(o, key, value)
    if getattr(args, "quiet", False):
        o["quiet"] = True
    if getattr(args, "domains", None) is not None:
        doms = [d.strip() for d in args.domains.split(",")]
        if not any(doms):
            raise PrismError("--domains is empty; give comma-separated names, e.g. --domains writing,coding")
        _put(o, "persona.domains", doms)
    files = {}
    for item in getattr(args, "persona_file", []) or []:
        if "=" not in item:
            raise PrismError(f"--persona-file wants DOMAIN=PATH, got '{item}'")
        dom, path = item.split("=", 1)
        if not Path(path).expanduser().is_file():
            raise PrismError(f"persona file not found: {path}")
        files[dom.strip()] = str(Path(path).expanduser().resolve())
    if files:
        _put(o, "persona.persona_files", files)
    if getattr(args, "queries_file", None):
        _put(o, "queries.queries_file", str(Path(args.queries_file).expanduser().resolve()))
    for item in getattr(args, "set", []) or []:
        if "=" not in item:
            raise PrismError(f"--set wants KEY=VALUE, got '{item}'")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        _put(o, key.strip(), value)
    return o


def saved_config(out: str | None) -> str | None:
    """``RUN/config.json`` of a run directory, if it has one (what a resumed run starts from)."""
    saved = Path(out or "runs/prism").expanduser() / "config.json"
    return str(saved) if saved.is_file() else None


def resume_from_saved_config(args: argparse.Namespace) -> None:
    """Without ``--config``, a rerun starts from the run's saved config (flags still override it)."""
    if not getattr(args, "config", None):
        args.config = saved_config(getattr(args, "out", None))


def config_from_args(args: argparse.Namespace, need_domains: bool = True):
    """defaults < preset < --config file < flags; a saved RUN/config.json is reused when resuming."""
    from ..config import resolve
    from ..errors import PrismError

    overrides = overrides_from_args(args)
    cfg_file = getattr(args, "config", None)
    cfg = resolve(file=cfg_file, overrides=overrides)
    if need_domains and not cfg.persona.domains:
        raise PrismError('no domains given; use --domains "writing,coding,safety" or a config file with persona.domains')
    check_judge_source(cfg, overrides, cfg_file, bool(getattr(args, "trust_judge", False)))
    return cfg


def check_judge_source(cfg, overrides: dict, cfg_file: str | None, confirmed: bool) -> None:
    """A ``module:function`` judge runs Python code. It is imported when the user typed it on this
    command line (``--judge`` / ``--set judge.judge=``) or confirms with ``--trust-judge``; a judge that
    only a file names (a received ``RUN/config.json`` or ``--config`` file) is refused with one line -
    unless the run's verdicts are already done, in which case it is never imported."""
    from ..errors import PrismError
    from ..judges import is_callable_spec

    spec = (cfg.judge.judge or "self").strip()
    typed = "judge" in (overrides.get("judge") or {})
    if typed or confirmed or not is_callable_spec(spec) or Path(spec).exists():
        return
    if (Path(cfg.out).expanduser() / "bootstrap.done.json").is_file():
        return
    raise PrismError(f"the judge '{spec}' named in {cfg_file} would run Python code; name it on the command "
                     f"line (--judge {spec}) or pass --trust-judge to import it")
