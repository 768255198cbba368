"""The config class of optiplug_optimi, imported when a config is first read (not by ``optiplug list``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

import optiplug


class StableAdamWConfig(optiplug.AdamFields):
    """StableAdamW (torch-optimi): AdamW with per-parameter update clipping; Kahan sums for low-precision weights."""

    name: Literal["stable_adamw"] = "stable_adamw"
    betas: optiplug.Betas = (0.9, 0.99)
    eps: float = Field(1e-6, gt=0, description="Term added to the denominator (torch-optimi's default, 1e-6).")
    weight_decay: float = Field(
        1e-2, ge=0, description="Weight decay, decoupled (scaled by lr / max_lr); not on biases and norms."
    )
    decouple_lr: bool = Field(
        False, description="Fully decoupled weight decay: not multiplied by the learning rate (then set max_lr)."
    )
    max_lr: float | None = Field(
        None, gt=0, description="With decouple_lr: the peak scheduled learning rate (default: lr)."
    )
    kahan_sum: bool | None = Field(
        None,
        description="Kahan-compensated updates: null turns them on for bfloat16 and float16 weights only (one "
        "more buffer of the weight's size); false never; true for low-precision weights.",
    )
    foreach: bool | None = Field(None, description="torch's foreach kernels (null: torch-optimi chooses).")
