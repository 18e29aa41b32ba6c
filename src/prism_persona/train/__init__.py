"""Stages 5-6 and the whole pipeline: gate training, self-distillation, assembly, report."""


def non_finite(loss, params) -> str:
    """What a training step made NaN or infinite: ``"loss"`` (a float or a scalar tensor), ``"weights"``
    (any of ``params``) or ``""`` when everything is finite. The gate and distillation stop on it."""
    import math

    import torch

    if not math.isfinite(float(loss)):
        return "loss"
    return "" if all(bool(torch.isfinite(p.detach()).all()) for p in params) else "weights"
