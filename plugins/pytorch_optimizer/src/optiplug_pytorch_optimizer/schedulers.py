"""pytorch-optimizer's learning-rate schedules that optiplug's built-in ones do not already offer.

* ``po_rex``: REX (rational decay, Chen et al. 2021), the curve of ``pytorch_optimizer.REXScheduler``.
* ``po_warmup_stable_decay``: pytorch-optimizer's warmup-stable-decay (``get_wsd_schedule``) with its
  own defaults: a ``1-sqrt`` cooldown (also ``1-square``, which transformers' WSD lacks).

Both scale every parameter group's own learning rate (a Muon-family optimizer keeps its two peaks);
``REXScheduler`` itself would set one absolute rate on every group, so REX is applied as a factor
(tested equal to ``REXScheduler`` on one group). Importing this module does not import torch.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

import optiplug

__all__ = ["RexConfig", "WarmupStableDecayConfig", "register"]


class RexConfig(optiplug.SchedulerConfig):
    """REX: rational decay from the peak to ``min_lr_ratio`` x the peak (pytorch-optimizer's REXScheduler)."""

    name: Literal["po_rex"] = "po_rex"
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final learning rate as a fraction of the peak.")


class WarmupStableDecayConfig(optiplug.SchedulerConfig):
    """Warmup, a stable phase, then a cooldown (pytorch-optimizer's get_wsd_schedule, its defaults)."""

    name: Literal["po_warmup_stable_decay"] = "po_warmup_stable_decay"
    warmup_steps: int = Field(0, ge=0, description="Linear warmup over this many optimizer steps.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Linear warmup over this fraction of the training steps.")
    decay_ratio: float = Field(0.2, gt=0, le=1, description="Fraction of the training steps spent cooling down.")
    cooldown_type: Literal["1-sqrt", "cosine", "linear", "1-square"] = Field(
        "1-sqrt", description="Shape of the cooldown."
    )
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Learning rate after the cooldown, as a fraction.")
    num_cycles: float = Field(0.5, gt=0, description="Cosine cycles of the cooldown (cooldown_type cosine only).")

    @model_validator(mode="after")
    def _one_warmup(self) -> WarmupStableDecayConfig:
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("set warmup_steps or warmup_ratio, not both")
        return self


def rex_factor(step: int, total_steps: int, min_lr_ratio: float) -> float:
    """REXScheduler's learning rate at ``step`` for a peak of 1 (its ``get_linear_lr``)."""
    if step >= total_steps:
        return min_lr_ratio
    progress = step / total_steps
    return min_lr_ratio + (1.0 - min_lr_ratio) * ((1.0 - progress) / (1.0 - progress / 2.0))


def build_rex(ctx: optiplug.ScheduleContext, cfg: RexConfig) -> object:
    """A ``LambdaLR`` with REX's curve over the run's steps."""
    from functools import partial

    from torch.optim.lr_scheduler import LambdaLR

    total = max(1, ctx.num_training_steps)
    return LambdaLR(ctx.optimizer, partial(rex_factor, total_steps=total, min_lr_ratio=cfg.min_lr_ratio))


def build_wsd(ctx: optiplug.ScheduleContext, cfg: WarmupStableDecayConfig) -> object:
    """pytorch-optimizer's ``get_wsd_schedule``: warmup, stable until the cooldown, cooldown to the end."""
    from pytorch_optimizer.lr_scheduler.wsd import get_wsd_schedule

    total = ctx.num_training_steps
    warmup = ctx.warmup_steps(cfg.warmup_steps, cfg.warmup_ratio)
    decay = min(max(0, total - warmup), math.ceil(cfg.decay_ratio * total))
    return get_wsd_schedule(
        ctx.optimizer,
        num_warmup_steps=warmup,
        num_stable_steps=max(0, total - warmup - decay),
        num_decay_steps=decay,
        min_lr_ratio=cfg.min_lr_ratio,
        num_cycles=cfg.num_cycles,
        cooldown_type=cfg.cooldown_type,
    )


def check_wsd(ctx: optiplug.ScheduleContext, cfg: WarmupStableDecayConfig) -> None:
    """The warmup must be shorter than the run (the rate would never reach its peak)."""
    ctx.check_warmup(cfg.name, cfg.warmup_steps, cfg.warmup_ratio)


def register(register: object) -> None:
    """Register the two schedules with optiplug's ``register`` callable."""
    requires = ("pytorch-optimizer",)
    register(  # type: ignore[operator]
        optiplug.SchedulerEntry(
            config=RexConfig, build=build_rex, summary="REX rational decay (pytorch-optimizer)", requires=requires
        )
    )
    register(  # type: ignore[operator]
        optiplug.SchedulerEntry(
            config=WarmupStableDecayConfig,
            build=build_wsd,
            check=check_wsd,
            summary="warmup, stable, 1-sqrt cooldown (pytorch-optimizer's WSD)",
            requires=requires,
        )
    )
