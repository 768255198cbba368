"""Config field types with their checks, and the Adam-family base config, for plugin authors.

A field typed ``LearningRate`` or ``Betas`` keeps its check when a subclass gives it a new default::

    class LionConfig(optiplug.AdamFields):
        name: Literal["lion"] = "lion"
        lr: optiplug.LearningRate = 1e-4          # a new default keeps the lr > 0 check
        betas: optiplug.Betas = (0.9, 0.99)       # a new default keeps the [0, 1) check

Importing this module does not import torch.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from optiplug.configs import OptimizerConfig

__all__ = ["AdamFields", "Betas", "LearningRate"]

Beta = Annotated[float, Field(ge=0.0, lt=1.0)]
Betas = Annotated[
    tuple[Beta, Beta],
    Field(description="Coefficients of the running averages of the gradient and its square, each in [0, 1)."),
]
"""Two betas, each in [0, 1): the type carries the check, so a new default keeps it."""

LearningRate = Annotated[
    float, Field(gt=0.0, allow_inf_nan=False, description="Learning rate (the peak of the schedule).")
]
"""A finite learning rate > 0."""


class AdamFields(OptimizerConfig):
    """Base for configs of Adam-family optimizers: ``lr``, ``betas``, ``eps``, ``weight_decay`` with their checks.

    Subclass it and add ``name: Literal[...]``; re-declare a field to change its default
    (``lr: optiplug.LearningRate = 3e-4``) and the check comes with the type.
    """

    lr: LearningRate = 1e-3
    betas: Betas = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0, description="Term added to the denominator for numerical stability.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay (not applied to biases and norms).")
