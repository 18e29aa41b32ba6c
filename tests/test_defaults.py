"""One set of defaults: the dataclasses of :mod:`prism_persona.config`.

A library function or class that takes a setting by the name of a config field either requires it or
defaults to that field's default (``None`` = "not given", decided by the caller): a second default in
a signature would silently differ from the documented one the day either changes.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing

from prism_persona import command_settings as CS
from prism_persona import config as C

# module prefix -> the settings blocks its functions and classes take (settings by these names)
BLOCKS = {
    "prism_persona.bootstrap.personas": (C.PersonaConfig,),
    "prism_persona.bootstrap.queries": (C.QueryConfig,),
    "prism_persona.bootstrap.answers": (C.AnswerConfig,),
    "prism_persona.bootstrap.verify": (C.JudgeConfig,),
    "prism_persona.gated.features": (C.GateConfig,),
    "prism_persona.gated.gate": (C.GateConfig,),
    "prism_persona.train.gate": (C.GateConfig,),
    "prism_persona.train.distill": (C.DistillConfig,),
    "prism_persona.train.check": (C.CheckConfig, C.JudgeConfig),
    # where models are loaded or served: the model block and the engine block
    "prism_persona.models": (C.ModelConfig,),
    "prism_persona.engines.hf": (C.ModelConfig, C.EngineConfig),
    "prism_persona.engines.openai": (C.EngineConfig,),
    "prism_persona.engines.vllm": (C.EngineConfig,),
    "prism_persona.gated.remote": (C.ModelConfig,),
    "prism_persona.gated.router": (C.ModelConfig,),
    "prism_persona.gated.model": (C.ModelConfig,),
    "prism_persona.serve.offline": (C.ModelConfig,),
    "prism_persona.evals.build": (C.ModelConfig,),
}
RUN_FIELDS = tuple(k for k, t in typing.get_type_hints(C.RunConfig).items() if not dataclasses.is_dataclass(t))


def field_defaults(blocks) -> dict:
    """field name -> its default in ``blocks`` (and the top-level fields of RunConfig: seed, quiet...)."""
    out: dict = {}
    for cls in (*blocks, C.RunConfig):
        for f in dataclasses.fields(cls):
            if cls is C.RunConfig and f.name not in RUN_FIELDS:
                continue
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
    return out


def public_callables(module_name: str):
    """(qualified name, callable) of every public function, class and method defined in the module."""
    mod = importlib.import_module(module_name)
    for name, obj in vars(mod).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
            continue
        if inspect.isfunction(obj):
            yield f"{mod.__name__}.{name}", obj
        elif inspect.isclass(obj) and not dataclasses.is_dataclass(obj):
            yield f"{mod.__name__}.{name}", obj.__init__
            for meth_name, meth in vars(obj).items():
                if not meth_name.startswith("_") and inspect.isfunction(meth):
                    yield f"{mod.__name__}.{name}.{meth_name}", meth


def second_defaults(fn, known: dict) -> list[str]:
    """``name=default`` of each parameter of ``fn`` named like a setting whose default differs from it."""
    out = []
    for p in inspect.signature(fn).parameters.values():
        if p.default is inspect.Parameter.empty or p.default is None or p.name not in known:
            continue
        if not same(p.default, known[p.name]):
            out.append(f"{p.name}={p.default!r} (config: {known[p.name]!r})")
    return out


def same(a, b) -> bool:
    norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    return norm(a) == norm(b)


def test_no_library_default_differs_from_its_settings_default():
    wrong = []
    for module_name, blocks in BLOCKS.items():
        known = field_defaults(blocks)
        for where, fn in public_callables(module_name):
            wrong += [f"{where}: {w}" for w in second_defaults(fn, known)]
    assert not wrong, "library defaults that differ from config.py:\n" + "\n".join(wrong)


def test_the_check_finds_a_second_default():
    """The introspection sees a mismatching default (so the test above can fail) and accepts a match."""

    def old_gate(features, pooling="last", dropout=0.1, hidden_sizes=None):  # GateConfig: "mean", 0.1
        return features

    assert second_defaults(old_gate, field_defaults((C.GateConfig,))) == ["pooling='last' (config: 'mean')"]


# ---------------------------------------------------------------------------------------------------
# no default re-supplied where a setting is read: ``cfg.dtype or "auto"`` restates the field's default
# (and hides a None that should not be there); the settings block owns it.

SETTINGS_CLASSES = (
    C.ModelConfig,
    C.EngineConfig,
    C.PersonaConfig,
    C.QueryConfig,
    C.AnswerConfig,
    C.JudgeConfig,
    C.GateConfig,
    C.DistillConfig,
    C.CheckConfig,
    CS.LoadSettings,
    CS.RoutingSettings,
    CS.SamplingSettings,
)


def _settings_defaults() -> dict:
    from prism_persona.evals.settings import EvalConfig

    out: dict = {}
    for cls in (*SETTINGS_CLASSES, EvalConfig):
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING and isinstance(f.default, (str, int, float)):
                out.setdefault(f.name, set()).add(f.default)
    return out


def resupplied_defaults(source: str, defaults: dict) -> list[str]:
    """``x.FIELD or LITERAL`` where LITERAL is a default of a setting named FIELD (line: text)."""
    import ast

    out = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or) and len(node.values) == 2):
            continue
        left, right = node.values
        name = left.attr if isinstance(left, ast.Attribute) else None
        if name in defaults and isinstance(right, ast.Constant) and right.value in defaults[name]:
            if right.value in ("", 0, False) and not isinstance(right.value, str):
                continue
            out.append(f"{node.lineno}: {ast.unparse(node)}")
    return out


def test_no_setting_default_is_resupplied_with_or():
    from pathlib import Path

    import prism_persona

    defaults = _settings_defaults()
    src = Path(prism_persona.__file__).resolve().parent
    found = []
    for path in sorted(src.rglob("*.py")):
        found += [f"{path.relative_to(src)}:{hit}" for hit in resupplied_defaults(path.read_text(), defaults)]
    assert not found, "settings defaults written a second time:\n" + "\n".join(found)


def test_the_scan_finds_a_resupplied_default():
    defaults = {"dtype": {"auto"}, "batch_size": {8}}
    hits = resupplied_defaults(
        "x = cfg.dtype or 'auto'\ny = cfg.batch_size or 8\nz = cfg.dtype or 'float32'\n", defaults
    )
    assert [h.split(":")[0] for h in hits] == ["1", "2"]
