"""The config classes of optiplug_lomo, imported when a config is first read (not by ``optiplug list``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

import optiplug


class LomoConfig(optiplug.OptimizerConfig):
    """LOMO: SGD fused into the backward pass (no gradients held, no optimizer state)."""

    name: Literal["lomo"] = "lomo"
    lr: optiplug.LearningRate = 1e-3
    weight_decay: float = Field(0.0, ge=0, description="Weight decay on every trainable parameter (LOMO's rule).")
    clip_grad_norm: float | None = Field(
        None, gt=0, description="Clip the global gradient norm: a second backward pass computes it first."
    )
    clip_grad_value: float | None = Field(None, gt=0, description="Clamp each gradient element to +-this.")


class AdaLomoConfig(LomoConfig):
    """AdaLomo: LOMO with Adafactor's factored second moments and update clipping, relative step size."""

    name: Literal["adalomo"] = "adalomo"  # type: ignore[assignment]
    eps: tuple[float, float] = Field(
        (1e-30, 1e-3), description="Added to the squared gradient; the smallest parameter scale of the step size."
    )
    clip_threshold: float = Field(1.0, gt=0, description="Clip the update's root-mean-square to this.")
    decay_rate: float = Field(-0.8, lt=0, description="Exponent of the second moments' decay schedule.")
    loss_scale: float = Field(
        1024.0, gt=0, description="Static loss scale (the loss is multiplied, the gradients divided by it)."
    )
