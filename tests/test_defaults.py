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
