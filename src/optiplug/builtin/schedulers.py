"""transformers' learning-rate schedulers, each with a config whose fields are its real parameters.

Warmup is ``warmup_steps`` (a count) or ``warmup_ratio`` (a fraction of the training steps);
setting both is an error. The config classes live in ``optiplug.builtin.configs``, imported when a config is
first read (not by ``optiplug list``), and are still importable from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from optiplug.builtin import CONFIGS, lazy_config
from optiplug.configs import SchedulerConfig
from optiplug.context import ScheduleContext
from optiplug.entries import Alias, SchedulerEntry, lazy_attributes
from optiplug.hookspecs import hookimpl

if TYPE_CHECKING:
    from optiplug.builtin.configs import (
        ConstantConfig,
        ConstantWithWarmupConfig,
        CosineConfig,
        CosineWarmupWithMinLrConfig,
        CosineWithMinLrConfig,
        CosineWithRestartsConfig,
        GreedyConfig,
        InverseSqrtConfig,
        LinearConfig,
        PolynomialConfig,
        ReduceLROnPlateauConfig,
        WarmupStableDecayConfig,
        _Warmup,
    )

__getattr__ = lazy_attributes(
    __name__,
    CONFIGS,
    [
        "LinearConfig",
        "CosineConfig",
        "CosineWithRestartsConfig",
        "PolynomialConfig",
        "ConstantConfig",
        "ConstantWithWarmupConfig",
        "InverseSqrtConfig",
        "CosineWithMinLrConfig",
        "WarmupStableDecayConfig",
        "ReduceLROnPlateauConfig",
        "CosineWarmupWithMinLrConfig",
        "GreedyConfig",
    ],
)

DEFAULT = "cosine"
"""What a scheduler section without a name selects."""


def check_warmup(ctx: ScheduleContext, cfg: _Warmup) -> None:
    """A schedule with a warmup: the warmup must be shorter than the run (WSD: warmup and decay fit in it)."""
    cfg.check(ctx)


def build_linear(ctx: ScheduleContext, cfg: LinearConfig):
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(ctx.optimizer, cfg.warmup(ctx), ctx.num_training_steps)


def build_cosine(ctx: ScheduleContext, cfg: CosineConfig):
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(ctx.optimizer, cfg.warmup(ctx), ctx.num_training_steps, cfg.num_cycles)


def build_cosine_with_restarts(ctx: ScheduleContext, cfg: CosineWithRestartsConfig):
    from transformers import get_cosine_with_hard_restarts_schedule_with_warmup

    return get_cosine_with_hard_restarts_schedule_with_warmup(
        ctx.optimizer, cfg.warmup(ctx), ctx.num_training_steps, cfg.num_cycles
    )


def build_polynomial(ctx: ScheduleContext, cfg: PolynomialConfig):
    from transformers import get_polynomial_decay_schedule_with_warmup

    return get_polynomial_decay_schedule_with_warmup(
        ctx.optimizer, cfg.warmup(ctx), ctx.num_training_steps, lr_end=cfg.lr_end, power=cfg.power
    )


def build_constant(ctx: ScheduleContext, cfg: ConstantConfig):
    from transformers import get_constant_schedule

    return get_constant_schedule(ctx.optimizer)


def build_constant_with_warmup(ctx: ScheduleContext, cfg: ConstantWithWarmupConfig):
    from transformers import get_constant_schedule_with_warmup

    return get_constant_schedule_with_warmup(ctx.optimizer, cfg.warmup(ctx))


def build_inverse_sqrt(ctx: ScheduleContext, cfg: InverseSqrtConfig):
    from transformers.optimization import get_inverse_sqrt_schedule

    return get_inverse_sqrt_schedule(ctx.optimizer, cfg.warmup(ctx), timescale=cfg.timescale)


def build_cosine_with_min_lr(ctx: ScheduleContext, cfg: CosineWithMinLrConfig):
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    floor = {"min_lr": cfg.min_lr} if cfg.min_lr is not None else {"min_lr_rate": cfg.min_lr_rate}
    return get_cosine_with_min_lr_schedule_with_warmup(
        ctx.optimizer, cfg.warmup(ctx), ctx.num_training_steps, num_cycles=cfg.num_cycles, **floor
    )


def build_cosine_warmup_with_min_lr(ctx: ScheduleContext, cfg: CosineWarmupWithMinLrConfig):
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup_lr_rate

    floor = {"min_lr": cfg.min_lr} if cfg.min_lr is not None else {"min_lr_rate": cfg.min_lr_rate}
    return get_cosine_with_min_lr_schedule_with_warmup_lr_rate(
        ctx.optimizer,
        cfg.warmup(ctx),
        ctx.num_training_steps,
        num_cycles=cfg.num_cycles,
        warmup_lr_rate=cfg.warmup_lr_rate,
        **floor,
    )


def build_greedy(ctx: ScheduleContext, cfg: GreedyConfig):
    from transformers.optimization import get_greedy_schedule

    return get_greedy_schedule(ctx.optimizer, **cfg.model_dump(exclude={"name"}))


def build_wsd(ctx: ScheduleContext, cfg: WarmupStableDecayConfig):
    from transformers.optimization import get_wsd_schedule

    warmup, stable, decay = cfg.lengths(ctx)
    return get_wsd_schedule(
        ctx.optimizer,
        num_warmup_steps=warmup,
        num_decay_steps=decay,
        num_stable_steps=stable,
        warmup_type=cfg.warmup_type,
        decay_type=cfg.decay_type,
        min_lr_ratio=cfg.min_lr_ratio,
        num_cycles=cfg.num_cycles,
    )


def build_plateau(ctx: ScheduleContext, cfg: ReduceLROnPlateauConfig):
    import torch

    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        ctx.optimizer,
        mode=cfg.mode,
        factor=cfg.factor,
        patience=cfg.patience,
        threshold=cfg.threshold,
        min_lr=cfg.min_lr,
    )


def wsd_arguments(args: Any, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """transformers' ``lr_scheduler_kwargs`` for ``warmup_stable_decay``: ``num_decay_steps`` and
    ``num_stable_steps`` are ``decay_steps`` and ``stable_steps`` here (without ``num_decay_steps``, which
    transformers requires, the decay is ``decay_ratio`` of the run)."""
    renames = {"num_decay_steps": "decay_steps", "num_stable_steps": "stable_steps"}
    return {renames.get(key, key): value for key, value in kwargs.items()}


# ---- one line on the schedule a run gets (the run header) -------------------------------------


def describe_warmup(ctx: ScheduleContext, cfg: _Warmup) -> str:
    """``warmup 10 steps, then cosine decay to 0 over 390 steps``."""
    warmup = cfg.warmup(ctx)
    rest = cfg.after_warmup(max(ctx.num_training_steps - warmup, 0))
    return f"warmup {warmup} step{'s' if warmup != 1 else ''}, then {rest}" if warmup else rest


def describe_constant(ctx: ScheduleContext, cfg: ConstantConfig) -> str:
    return f"constant for {ctx.num_training_steps} steps"


def describe_wsd(ctx: ScheduleContext, cfg: WarmupStableDecayConfig) -> str:
    """``warmup 10 + stable 350 + decay 40 steps (linear warmup, cosine decay to 0 x lr)``."""
    warmup, stable, decay = cfg.lengths(ctx)
    line = (
        f"warmup {warmup} + stable {stable} + decay {decay} steps ({cfg.warmup_type} warmup, {cfg.decay_type} "
        f"decay to {cfg.min_lr_ratio:g} x lr)"
    )
    after = ctx.num_training_steps - warmup - stable - decay
    return line + (f", then {after} steps at the floor" if after > 0 else "")


def describe_greedy(ctx: ScheduleContext, cfg: GreedyConfig) -> str:
    return (
        f"the rate times or divided by {cfg.factor:g} as the eval loss improves or not for {cfg.patience} "
        f"evaluations (between {cfg.min_lr:g} and {cfg.max_lr:g})"
    )


def wsd_cooldown(cfg: WarmupStableDecayConfig) -> dict[str, Any]:
    """A cooldown from a WSD checkpoint decays as the schedule's own decay does, to its floor."""
    return {"decay_type": cfg.decay_type, "min_lr_ratio": cfg.min_lr_ratio, "num_cycles": cfg.num_cycles}


def own_cooldown(cfg: SchedulerConfig) -> dict[str, Any]:
    """A constant schedule has no decay: a cooldown from its checkpoints takes the cooldown's own shape and floor."""
    return {}


def describe_plateau(ctx: ScheduleContext, cfg: ReduceLROnPlateauConfig) -> str:
    return (
        f"the rate times {cfg.factor:g} after {cfg.patience} evaluations without improvement of the eval loss "
        f"(floor {cfg.min_lr:g})"
    )


@hookimpl
def register_schedulers(register):
    register(
        SchedulerEntry(
            config=lazy_config("linear", "LinearConfig"),
            describe=describe_warmup,
            check=check_warmup,
            build=build_linear,
            summary="linear decay to 0 after warmup",
        )
    )
    register(
        SchedulerEntry(
            config=lazy_config("cosine", "CosineConfig"),
            describe=describe_warmup,
            check=check_warmup,
            build=build_cosine,
            summary="cosine decay to 0 after warmup",
        )
    )
    register(
        SchedulerEntry(
            config=lazy_config("cosine_with_restarts", "CosineWithRestartsConfig"),
            describe=describe_warmup,
            check=check_warmup,
            build=build_cosine_with_restarts,
            summary="cosine with hard restarts",
        )
    )
    register(
        SchedulerEntry(
            config=lazy_config("polynomial", "PolynomialConfig"),
            describe=describe_warmup,
            check=check_warmup,
            build=build_polynomial,
            summary="polynomial decay to lr_end",
        )
    )
    register(
        SchedulerEntry(
            config=lazy_config("constant", "ConstantConfig"),
            describe=describe_constant,
            build=build_constant,
            summary="constant learning rate",
            cooldown=own_cooldown,
        )
    )
    register(
        SchedulerEntry(
            config=lazy_config("constant_with_warmup", "ConstantWithWarmupConfig"),
            cooldown=own_cooldown,
            describe=describe_warmup,
            check=check_warmup,
            build=build_constant_with_warmup,
            summary="constant after warmup",
        )
    )
    register(
        SchedulerEntry(
            config=lazy_config("inverse_sqrt", "InverseSqrtConfig"),
            describe=describe_warmup,
            check=check_warmup,
            build=build_inverse_sqrt,
            summary="inverse square-root decay",
        )
    )
    register(
        SchedulerEntry(
            config=lazy_config("cosine_with_min_lr", "CosineWithMinLrConfig"),
            describe=describe_warmup,
            check=check_warmup,
            build=build_cosine_with_min_lr,
            summary="cosine decay to a floor",
        )
    )
    register(
        SchedulerEntry(
            config=lazy_config("warmup_stable_decay", "WarmupStableDecayConfig"),
            aliases=(Alias("warmup_stable_decay", transformers=True, arguments=wsd_arguments),),
            describe=describe_wsd,
            check=check_warmup,
            cooldown=wsd_cooldown,
            build=build_wsd,
            summary="warmup, stable, decay (WSD)",
        )
    )
    register(
        SchedulerEntry(
            config=lazy_config("reduce_lr_on_plateau", "ReduceLROnPlateauConfig"),
            describe=describe_plateau,
            build=build_plateau,
            summary="reduce on plateau of the eval metric",
        )
    )
    register(
        SchedulerEntry(
            config=lazy_config("cosine_warmup_with_min_lr", "CosineWarmupWithMinLrConfig"),
            describe=describe_warmup,
            check=check_warmup,
            build=build_cosine_warmup_with_min_lr,
            summary="cosine decay to a floor, warmup from a floor",
        )
    )
    register(
        SchedulerEntry(
            config=lazy_config("greedy", "GreedyConfig"),
            describe=describe_greedy,
            build=build_greedy,
            summary="GreedyLR: follows the eval metric",
        )
    )
