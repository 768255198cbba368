"""The configs of the three schedule-free optimizers. Importing this module does not import torch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

import optiplug

WARMUP_STEPS = Field(
    0,
    ge=0,
    description="Linear learning-rate warmup over this many optimizer steps, done by the optimizer itself "
    "(schedulefree's warmup_steps); the scheduler must be 'constant'.",
)
R = Field(0.0, ge=0, description="Polynomial weighting of the average: iterate k gets weight k**r (schedulefree's r).")
WEIGHT_LR_POWER = Field(
    2.0,
    ge=0,
    description="The average weighs each iterate by the largest learning rate so far raised to this power "
    "(matters during warmup; 0: no weighting).",
)
FOREACH = Field(True, description="Use torch's batched foreach kernels (faster; more peak memory in the step).")


class _ScheduleFreeAdamFamily(optiplug.AdamFields):
    """lr, betas, eps, weight decay (optiplug's Adam fields and checks), and the schedule-free average's settings."""

    r: float = R
    weight_lr_power: float = WEIGHT_LR_POWER
    foreach: bool = FOREACH

    @model_validator(mode="after")
    def _beta1_positive(self) -> _ScheduleFreeAdamFamily:
        if self.betas[0] <= 0:
            raise ValueError(
                f"betas[0] must be above 0 for schedule-free (x is recovered from y and z by dividing by it), got "
                f"{self.betas[0]}"
            )
        return self


class ScheduleFreeAdamWConfig(_ScheduleFreeAdamFamily):
    """Schedule-free AdamW (Defazio et al. 2024, ``schedulefree.AdamWScheduleFree``): no learning-rate schedule;
    the model is saved and evaluated at the averaged weights x."""

    name: Literal["schedule_free_adamw"] = "schedule_free_adamw"
    lr: optiplug.LearningRate = 2.5e-3
    warmup_steps: int = WARMUP_STEPS


class ScheduleFreeRAdamConfig(_ScheduleFreeAdamFamily):
    """Schedule-free RAdam (``schedulefree.RAdamScheduleFree``): RAdam's rectification replaces the warmup."""

    name: Literal["schedule_free_radam"] = "schedule_free_radam"
    lr: optiplug.LearningRate = 2.5e-3
    silent_sgd_phase: bool = Field(
        True,
        description="While RAdam's rectification is undefined (the first 4 steps at beta2 0.999), take no step; "
        "false: take plain SGD steps.",
    )


class ScheduleFreeSGDConfig(optiplug.OptimizerConfig):
    """Schedule-free SGD (``schedulefree.SGDScheduleFree``): SGD with momentum replaced by schedule-free averaging."""

    name: Literal["schedule_free_sgd"] = "schedule_free_sgd"
    lr: optiplug.LearningRate = 1.0
    momentum: float = Field(
        0.9, gt=0, lt=1, description="Interpolation between the average x and the SGD iterate z, in (0, 1)."
    )
    weight_decay: float = Field(0.0, ge=0, description="Weight decay (not applied to biases and norms).")
    warmup_steps: int = WARMUP_STEPS
    r: float = R
    weight_lr_power: float = WEIGHT_LR_POWER
    foreach: bool = FOREACH


ScheduleFreeConfig = ScheduleFreeAdamWConfig | ScheduleFreeRAdamConfig | ScheduleFreeSGDConfig
