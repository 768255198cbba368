"""A learning-rate schedule as an optiplug plugin: linear warmup, then exponential decay with a half-life."""

from typing import Literal

from pydantic import Field

import optiplug


class HalfLifeConfig(optiplug.SchedulerConfig):
    """Linear warmup, then exponential decay: the rate above the floor halves every half-life."""

    name: Literal["half_life"] = "half_life"
    warmup_steps: int = Field(0, ge=0, description="Linear warmup over this many optimizer steps.")
    half_life_ratio: float = Field(0.25, gt=0, description="Half-life as a fraction of the training steps.")
    min_lr_ratio: float = Field(0.0, ge=0, lt=1, description="Floor as a fraction of the peak.")


def half_life_factor(step: int, total: int, cfg: HalfLifeConfig) -> float:
    """The multiplier of each parameter group's initial learning rate at ``step``."""
    if step < cfg.warmup_steps:
        return step / cfg.warmup_steps
    decayed = 0.5 ** ((step - cfg.warmup_steps) / (cfg.half_life_ratio * total))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decayed


def build_half_life(ctx: optiplug.ScheduleContext, cfg: HalfLifeConfig):
    from torch.optim.lr_scheduler import LambdaLR  # heavy imports inside the factory

    total = ctx.num_training_steps
    # LambdaLR multiplies each group's initial rate: groups keep their proportions (optimizer.param_groups).
    return LambdaLR(ctx.optimizer, lambda step: half_life_factor(step, total, cfg))


@optiplug.hookimpl
def register_schedulers(register):
    register(
        optiplug.SchedulerEntry(config=HalfLifeConfig, build=build_half_life, summary="warmup, then half-life decay")
    )
