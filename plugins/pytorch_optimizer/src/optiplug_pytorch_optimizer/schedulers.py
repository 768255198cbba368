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
from typing import TYPE_CHECKING

import optiplug

if TYPE_CHECKING:
    from optiplug_pytorch_optimizer.config import RexConfig, WarmupStableDecayConfig

__all__ = ["RexConfig", "WarmupStableDecayConfig", "register"]

CONFIGS = "optiplug_pytorch_optimizer.config"  # imported when a config is first read, not by `optiplug list`
__getattr__ = optiplug.lazy_attributes(__name__, CONFIGS, ["RexConfig", "WarmupStableDecayConfig"])


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
            config=optiplug.LazyConfig.from_module("po_rex", f"{CONFIGS}:RexConfig"),
            build=build_rex,
            summary="REX rational decay (pytorch-optimizer)",
            requires=requires,
        )
    )
    register(  # type: ignore[operator]
        optiplug.SchedulerEntry(
            config=optiplug.LazyConfig.from_module("po_warmup_stable_decay", f"{CONFIGS}:WarmupStableDecayConfig"),
            build=build_wsd,
            check=check_wsd,
            summary="warmup, stable, 1-sqrt cooldown (pytorch-optimizer's WSD)",
            requires=requires,
        )
    )
