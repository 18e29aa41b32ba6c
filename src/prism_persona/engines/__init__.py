"""Text generation and log-probability scoring behind one small interface.

``Engine.generate`` is the one method every engine implements; ``Engine.score_choices`` is optional
(engines that cannot return log-probabilities return ``None`` and judges fall back to parsing text).
"""

from .base import Completion, Engine, SamplingParams

__all__ = ["Completion", "Engine", "SamplingParams", "make_engine"]


def make_engine(cfg, model=None, tokenizer=None):
    """Build the engine a :class:`~prism_persona.config.RunConfig` asks for (heavy imports inside)."""
    if cfg.engine.engine == "openai":
        from .openai import OpenAIEngine

        return OpenAIEngine.from_config(cfg)
    from .hf import HFEngine

    if model is None:
        return HFEngine.from_config(cfg)
    from ..models import resolve_model

    return HFEngine(model, tokenizer, batch_size=cfg.model.batch_size, quiet=cfg.quiet,
                    model_name=resolve_model(cfg.model.model).display)
