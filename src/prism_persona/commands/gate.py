"""`prism gate`: train the routing gate of a bootstrapped run (one stage of `prism run`)."""

from __future__ import annotations

from .common import add_stage_parser

DESCRIPTION = """\
Train the gate on RUN's labelled queries: a logistic regression (an MLP with gate.hidden_sizes) on
the hidden states after decoder layer 0 of each query's prompt (their mean over the prompt's tokens;
gate.pooling=last reads the last token), predicting whether the persona answer won. Writes RUN/gate/ (gate.safetensors,
gate_config.json with threshold and metrics) and assembles RUN/prism when distillation is done too."""


def add_parser(sub) -> None:
    add_stage_parser(
        sub, "gate", "train the routing gate of a run (stage of `prism run`)", DESCRIPTION, "gate.calibrate=rate:0.3"
    )
