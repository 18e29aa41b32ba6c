"""What a file may say: what was run, never how to run here.

A config file (a received ``RUN/config.json``, a ``--config`` file) records every setting of a run, but the
settings that run code, reach the network or read files of this machine (:data:`HOW_TO_RUN`,
:data:`LOCAL_FILES`) are used only when this command line says them too (:func:`check_how_to_run`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, get_type_hints

from .config import QUERIES_FILE_SETTINGS, RunConfig, engine_how_to_run, engine_spec, is_queries_file, run_set_only
from .errors import PrismError
from .options import to_dict

HOW_TO_RUN = ("model.trust_remote_code", "engine.engine", "engine.base_url", "engine.api_key_env")
QUERIES_FILES = tuple(f"gate.{key}" for key in QUERIES_FILE_SETTINGS)  # gate.base_queries, gate.ood_contrast
LOCAL_FILES = ("persona.persona_files", "queries.queries_file", "check.queries", *QUERIES_FILES)
"""Settings that run code, reach the network or read files on this machine. A config file (a received
``RUN/config.json``, a ``--config`` file) may record them - the saved config says what was run - but
they are used only when this command line says them too (:func:`check_how_to_run`); each engine's own
such options join them (:func:`config.engine_how_to_run`)."""


def check_how_to_run(cfg: RunConfig, file_data: dict, typed: dict, source: str, run_dir: str = "") -> None:
    """Refuse, with one line naming the flag to pass, a setting of :data:`HOW_TO_RUN` (and, for a run's
    own saved config, a local file of :data:`LOCAL_FILES` outside ``run_dir``) that ``file_data`` (what
    the file ``source`` says) sets and this command line (``typed``) does not. Engine settings that the
    engine in use ignores are not refused (a saved ``base_url`` does nothing for ``--engine hf``)."""
    keys = HOW_TO_RUN + engine_how_to_run() + (LOCAL_FILES if run_dir else ())
    refused = [key for key in keys if _from_file_only(cfg, key, file_data, typed, run_dir)]
    if refused:
        said = ", ".join(f"{key} = {_dotted(file_data, key)!r}" for key in refused)
        flags = ", ".join(_flag_for(key) for key in refused)
        raise PrismError(
            f"{source} sets {said}: how to run here (code, servers, files of this machine) is not taken "
            f"from a file; pass {flags} on the command line to use {'them' if len(refused) > 1 else 'it'}"
        )


def _from_file_only(cfg: RunConfig, key: str, file_data: dict, typed: dict, run_dir: str) -> bool:
    value = _dotted(file_data, key)
    if key in QUERIES_FILES and not is_queries_file(value):  # builtin / off name no file
        return False
    if value is None or _dotted(typed, key) is not None or value == _dotted(to_dict(RunConfig()), key):
        return False
    return _engine_uses(cfg, key) and not (key in LOCAL_FILES and _all_inside(value, run_dir))


def _put_dotted(data: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[leaf] = value


def _dotted(data: dict, key: str):
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _engine_uses(cfg: RunConfig, key: str) -> bool:
    spec = engine_spec(cfg.engine.engine)
    if not key.startswith("engine.") or spec is None:
        return True
    return spec.reads(cfg.engine, key.split(".", 1)[1])


def _all_inside(value, run_dir: str) -> bool:
    paths = value.values() if isinstance(value, dict) else [value]
    root = Path(run_dir).expanduser().resolve()
    return all(root in Path(str(p)).expanduser().resolve().parents for p in paths)


def _flag_for(key: str) -> str:
    if key == "persona.persona_files":
        return "--persona-file DOMAIN=PATH"
    if key.split(".")[-1] in run_set_only():
        return f"--set {key}=[...]"
    section, name = key.split(".")
    f = {f.name: f for f in dataclasses.fields(get_type_hints(RunConfig)[section])}[name]
    return f.metadata.get("flag") or f"--set {key}=..."
