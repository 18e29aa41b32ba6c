"""The settings machinery every settings dataclass shares, standard library only (``prism --help`` stays
instant): :func:`option` declares a setting once (default, help, flag, bounds); :func:`from_dict`,
:func:`to_dict` and :func:`merge` read and layer settings dicts with types coerced; :func:`add_flags`,
:func:`flag_values` and :func:`settings_from_args` derive command-line flags from the same fields; and
:func:`check_settings` checks every bound and choice (a one-line :class:`~prism_persona.errors.PrismError`).

The settings themselves live elsewhere: a run's in :mod:`prism_persona.config`, the artifact commands' in
:mod:`prism_persona.command_settings`, the evaluation's in :mod:`prism_persona.evals.settings`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import types
from dataclasses import field
from typing import Any, Union, get_args, get_origin, get_type_hints

from .errors import PrismError

log = logging.getLogger(__name__)


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    choices: Any = None,
    metavar: str | None = None,
    required: bool = False,
    group: str | None = None,
    cli: bool = True,
    at_least: Any = None,
    above: Any = None,
    at_most: Any = None,
    below: Any = None,
    shell_words: bool = False,
    **kwargs: Any,
) -> Any:
    """A dataclass field with a help string (shown by ``prism config`` and in the docs).

    The keywords describe the setting once, for every place that reads it: ``flag`` (the command-line
    flag when it is not ``--field-name``), ``choices``, ``metavar``, ``required`` (a flag the command
    needs), ``group`` (the ``--help`` section), ``cli=False`` (config file only), and bounds checked by
    :func:`check_settings` for flags and config files alike: ``at_least``/``at_most`` (inclusive),
    ``above``/``below`` (exclusive); ``shell_words``: a list setting given as one string is split
    like a shell command line (``--vllm-args "--tensor-parallel-size 4"``).
    """
    meta = {
        "help": help,
        "flag": flag,
        "choices": choices if isinstance(choices, list) else tuple(choices) if choices else None,
        "metavar": metavar,
        "required": required,
        "group": group,
        "cli": cli,
        "at_least": at_least,
        "above": above,
        "at_most": at_most,
        "below": below,
        "shell_words": shell_words,
    }
    meta = {k: v for k, v in meta.items() if v is not None and (v is not False or k == "cli")}
    meta["help"] = help
    if isinstance(default, (list, dict, set)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=meta, **kwargs)
    return field(default=default, metadata=meta, **kwargs)


# --------------------------------------------------------------------------------------------------
# settings dicts: read, coerced, layered


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _optional_inner(typ: Any) -> Any:
    """``X`` for ``Optional[X]`` (``X | None``), else None."""
    args = [a for a in get_args(typ) if a is not type(None)]
    if get_origin(typ) in (Union, types.UnionType) and len(args) == 1 and len(get_args(typ)) == 2:
        return args[0]
    return None


def _coerce(value: Any, typ: Any, where: str) -> Any:
    inner = _optional_inner(typ)
    if inner is not None:
        return None if value is None else _coerce(value, inner, where)
    origin = get_origin(typ) or typ
    if isinstance(origin, type) and dataclasses.is_dataclass(origin):
        if not isinstance(value, dict):
            raise PrismError(f"config: '{where}' must be a table/object, got {type(value).__name__}")
        return from_dict(origin, value, prefix=f"{where}.")
    if origin is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise PrismError(f"config: '{where}' must be true or false, got {value!r}")
    if origin is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise PrismError(f"config: '{where}' must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise PrismError(f"config: '{where}' must be an integer, got {value!r}") from None
    if origin is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise PrismError(f"config: '{where}' must be a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise PrismError(f"config: '{where}' must be a number, got {value!r}") from None
    if origin is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # --set parses JSON: --set engine.vllm_cpu_cores=0 gives the number 0
        if not isinstance(value, str):
            raise PrismError(f"config: '{where}' must be a string, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise PrismError(f"config: '{where}' must be a list, got {value!r}")
        item = (get_args(typ) or (Any,))[0]
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise PrismError(f"config: '{where}' must be a table/object, got {value!r}")
        item = (get_args(typ) or (Any, Any))[1]
        return {str(k): _coerce(v, item, f"{where}.{k}") for k, v in value.items()}
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build ``cls`` from a dict. Unknown keys are warned about (forward compatibility), types checked."""
    hints = get_type_hints(cls)
    fields_by_name = {f.name: f for f in dataclasses.fields(cls)}
    names = set(fields_by_name)
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            if not key.startswith("_"):
                log.warning("config: ignoring unknown key '%s%s'", prefix, key)
            continue
        if isinstance(value, str) and fields_by_name[key].metadata.get("shell_words"):
            value = _shell_words(value, fields_by_name[key].metadata.get("flag") or f"{prefix}{key}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    return cls(**kwargs)


def _shell_words(value: str, name: str) -> list:
    """``--vllm-args "--tensor-parallel-size 4"`` as a list; an unbalanced quote is one line."""
    import shlex

    try:
        return shlex.split(value)
    except ValueError as exc:
        raise PrismError(f"{name} is not valid shell words ({exc}): {value!r}") from None


def merge(base: dict, override: dict) -> dict:
    """Deep-merge ``override`` into a copy of ``base``."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("persona_files",):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------------------------------
# command-line flags derived from settings dataclasses


def _settings_fields(cls: type, prefix: str = "", skip: tuple = (), flagged_only: bool = False):
    """(field, type, flag, dest, dotted key) for every command-line setting of ``cls``, nested ones
    flattened; ``flagged_only``: only fields that name their flag (RunConfig: most keys are --set only)."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.metadata.get("cli", True) and not dataclasses.is_dataclass(hints[f.name]):
            continue
        typ = hints[f.name]
        if isinstance(typ, type) and dataclasses.is_dataclass(
            typ
        ):  # a block embedded with metadata flagged_only: only its named flags
            for sub in _settings_fields(typ, prefix, skip, flagged_only or f.metadata.get("flagged_only", False)):
                yield sub[:4] + (f"{f.name}.{sub[4]}",)
            continue
        if flagged_only and not f.metadata.get("flag"):
            continue
        flag = f.metadata.get("flag") or "--" + (prefix + f.name).replace("_", "-")
        yield f, typ, flag, flag.lstrip("-").replace("-", "_"), f.name


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _flag_help(f: dataclasses.Field) -> str:
    text = f.metadata.get("help", "")
    default = _default_of(f)
    if default is not None and default is not False and default not in ("", [], {}) and not f.metadata.get("required"):
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        text = f"{text} (default: {shown})"
    return text.replace("%", "%%")  # argparse %-formats help strings


def add_flags(parser: Any, cls: type, prefix: str = "", skip: tuple = (), flagged_only: bool = False) -> dict:
    """Add one command-line flag per setting of the dataclass ``cls`` (nested dataclasses flattened).

    ``--<prefix><field-name>`` unless the field's ``option(flag=...)`` names another; type, choices,
    metavar, ``required`` and the ``--help`` section come from the field, and its help string gets the
    default appended. argparse keeps no default of its own (every flag defaults to None), so the
    dataclass stays the one place defaults live and :func:`flag_values` can tell a typed flag from an
    untouched one. Standard library only (``prism --help`` stays instant). Returns the argument groups
    made (title -> group), for a command to add its own flags beside them.
    """
    groups: dict = {}
    for f, typ, flag, dest, _ in _settings_fields(cls, prefix, skip, flagged_only):
        title = f.metadata.get("group")
        target = parser if not title else groups.setdefault(title, parser.add_argument_group(title))
        kwargs: dict = {"dest": dest, "default": None, "help": _flag_help(f)}
        base = _optional_inner(typ) or typ
        if base is bool:
            kwargs["action"] = "store_false" if _default_of(f) is True else "store_true"
        else:
            kwargs["type"] = {int: int, float: float}.get(base, str)
            for key in ("choices", "metavar", "required"):
                if f.metadata.get(key):
                    kwargs[key] = f.metadata[key]
        target.add_argument(flag, **kwargs)
    return groups


def flag_values(cls: type, args: Any, prefix: str = "", skip: tuple = (), flagged_only: bool = False) -> dict:
    """The settings of ``cls`` typed on the command line (flags left out are absent), as a nested dict."""
    given = vars(args)
    out: dict = {}
    for _f, _, _, dest, key in _settings_fields(cls, prefix, skip, flagged_only):
        if given.get(dest) is not None:
            node = out
            *parents, leaf = key.split(".")
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = given[dest]
    return out


def settings_from_args(cls: type, args: Any, prefix: str = "", base: Any = None, skip: tuple = ()) -> Any:
    """An instance of ``cls``: its defaults (or ``base``, e.g. from a config file) < the flags typed.

    Types are coerced and every bound and choice checked (:func:`check_settings`): a bad value is a
    one-line :class:`PrismError` naming the flag, raised before any slow work starts.
    """
    start = to_dict(base) if base is not None else {}
    obj = from_dict(cls, merge(start, flag_values(cls, args, prefix, skip)))
    check_settings(obj, prefix=prefix, flags=True)
    return obj


def bound_error(value: Any, meta: Any) -> str | None:
    """What is wrong with the number ``value`` under the bounds in ``meta`` (``at_least``, ``above``,
    ``at_most``, ``below``), or None. NaN and the infinities fail every check (a comparison with NaN is
    always false: ``gate.threshold=NaN`` passed every bound and routed nothing)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value):
        return "must be a finite number"
    if meta.get("at_least") is not None and value < meta["at_least"]:
        return f"must be at least {meta['at_least']}"
    if meta.get("above") is not None and value <= meta["above"]:
        return f"must be greater than {meta['above']}"
    if meta.get("at_most") is not None and value > meta["at_most"]:
        return f"must be at most {meta['at_most']}"
    if meta.get("below") is not None and value >= meta["below"]:
        return f"must be less than {meta['below']}"
    return None


def check_settings(obj: Any, prefix: str = "", flags: bool = False, where: str = "") -> None:
    """Check every ``option`` bound and choice of a settings dataclass (recursively).

    The message names the flag (``flags=True``) or the dotted config key, plus the flag a RunConfig
    field declares, e.g. ``answers.max_new_tokens (--answer-tokens) must be at least 1, got 0``.
    """
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_settings(value, prefix, flags, f"{where}{f.name}.")
            continue
        meta = f.metadata
        flag = meta.get("flag") or "--" + (prefix + f.name).replace("_", "-")
        label = flag if flags else f"{where}{f.name}" + (f" ({meta['flag']})" if meta.get("flag") else "")
        items = value if isinstance(value, list) else [value]
        problem = next((p for p in (bound_error(v, meta) for v in items) if p), None)
        if meta.get("choices") and value not in meta["choices"] and value != _default_of(f):
            problem = f"must be one of {', '.join(map(str, meta['choices']))}"
        if problem:
            raise PrismError(f"{label} {problem}, got {value!r}")
    hook = getattr(obj, "validate", None)  # checks across fields, or beyond bounds (a device name)
    if callable(hook):
        hook()
    flag_hook = getattr(obj, "check_flags", None)  # mistakes only on a command line
    if flags and callable(flag_hook):
        flag_hook()


def describe_flags(cls: type, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(flag, default, help) for every command-line setting of ``cls``."""
    return [(flag, _default_of(f), f.metadata.get("help", "")) for f, _, flag, _, _ in _settings_fields(cls, prefix)]
