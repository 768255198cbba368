"""The config class of optiplug_grokadamw, imported when a config is first read (not by ``optiplug list``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

import optiplug


class GrokAdamWConfig(optiplug.AdamFields):
    """GrokAdamW: AdamW on the gradient amplified by its slow moving average; per-parameter gradient clipping."""

    name: Literal["grokadamw"] = "grokadamw"
    alpha_init: float = Field(0.98, ge=0, le=1, description="Decay of the slow moving average of the gradient.")
    lamb: float = Field(2.0, description="How much of the slow average is added to the gradient.")
    gamma: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="The first-moment coefficient of the i-th parameter of a group is betas[0] * (1 - gamma) ** i.",
    )
    grokking_signal_decay_rate: float = Field(
        0.1,
        ge=0,
        description="alpha_init is multiplied by exp(-rate * signal); the signal (eval loss above train loss) is 0 "
        "in a Trainer run, as in transformers' (nothing reports the losses to the optimizer).",
    )
    gradient_clipping: float = Field(
        1.0, ge=0, description="Clip each parameter's gradient to this norm on its own (0: off)."
    )
