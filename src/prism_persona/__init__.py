"""PRISM: Persona Routing via Intent-based Self-Modeling.

From a list of domain names, an instruction-tuned LLM writes its own expert personas, queries and
answers, judges them itself, and distils the persona behaviour that won into a LoRA adapter that a
tiny gate switches on per query, reading the hidden state after decoder layer 0 inside the prefill.

Nothing heavy is imported here: ``import prism_persona`` is instant; torch and transformers load on
first use of a submodule that needs them.
"""

__version__ = "0.1.0"

_LAZY = {
    "RunConfig": "config",
    "resolve_config": ("config", "resolve"),
    "load_model": "models",
    "GatedModel": ("gated.model", "GatedModel"),
    "Gate": ("gated.gate", "Gate"),
    "HFEngine": ("engines.hf", "HFEngine"),
    "SamplingParams": ("engines.base", "SamplingParams"),
    "RunDir": "store",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'prism_persona' has no attribute {name!r}")
    import importlib

    target = _LAZY[name]
    if name in ("RunConfig", "resolve_config"):  # the engines' options join the [engine] block as they register
        importlib.import_module(".engines", __name__)
    module, attr = (target, name) if isinstance(target, str) else target
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value
