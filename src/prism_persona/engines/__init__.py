"""Text generation and log-probability scoring behind one small interface.

``Engine.generate`` is the one method every engine implements; ``Engine.score_choices`` is optional
(engines that cannot return log-probabilities return ``None`` and judges fall back to parsing text).
"""

from .base import Completion, Engine, SamplingParams

__all__ = ["Completion", "Engine", "SamplingParams", "check_engine", "make_engine"]


def check_engine(cfg) -> None:
    """One-line errors for an engine that cannot be built (missing model, no vLLM), before slow work."""
    from ..models import resolve_model

    if cfg.engine.engine in ("hf", "vllm"):
        resolve_model(cfg.model.model)
    if cfg.engine.engine == "vllm" and not cfg.engine.base_url:
        from .vllm import find_vllm_python

        find_vllm_python(cfg.engine.vllm_python)


def make_engine(cfg, model=None, tokenizer=None):
    """Build the engine a :class:`~prism_persona.config.RunConfig` asks for (heavy imports inside):
    ``hf`` in-process (sharing ``model``/``tokenizer`` if given), ``vllm`` (starts or attaches to a
    vLLM server; ``close()`` stops a started one) or ``openai``."""
    if cfg.engine.engine == "openai":
        from .openai import OpenAIEngine

        return OpenAIEngine.from_config(cfg)
    if cfg.engine.engine == "vllm":
        from .vllm import VLLMEngine

        return VLLMEngine.from_config(cfg)
    from .hf import HFEngine

    if model is None:
        return HFEngine.from_config(cfg)
    from ..models import resolve_model

    return HFEngine(
        model,
        tokenizer,
        batch_size=cfg.model.batch_size,
        quiet=cfg.quiet,
        model_name=resolve_model(cfg.model.model).display,
    )
