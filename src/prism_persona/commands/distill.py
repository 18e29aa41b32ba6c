"""`prism distill`: distil the persona behaviour of a run into a LoRA (one stage of `prism run`)."""

from __future__ import annotations

from .common import add_stage_parser

DESCRIPTION = """\
Self-distillation on the queries whose persona answer won: the frozen model WITH the persona is the
teacher, the same model + LoRA (decoder layers 1..L-1) WITHOUT the persona is the student, trained
on the persona answers (KL over the teacher's top-k tokens, or CE). Resumable per epoch. Writes
RUN/distill/ (adapter/, checkpoint/, loss.jsonl, loss.png) and assembles RUN/prism when the gate
is trained too."""


def add_parser(sub) -> None:
    add_stage_parser(
        sub,
        "distill",
        "distil the persona behaviour into a LoRA (stage of `prism run`)",
        DESCRIPTION,
        "distill.loss=ce",
    )
