"""Stages 5-6 and the whole pipeline: gate training, self-distillation, assembly, report."""
