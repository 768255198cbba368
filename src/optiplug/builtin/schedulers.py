"""transformers' learning-rate schedulers, each with a config whose fields are its real parameters.

Warmup is ``warmup_steps`` (a count) or ``warmup_ratio`` (a fraction of the training steps);
setting both is an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, model_validator

from optiplug.configs import SchedulerConfig
from optiplug.context import ScheduleContext
from optiplug.entries import Alias, SchedulerEntry
from optiplug.errors import ConfigError
from optiplug.hookspecs import hookimpl

DEFAULT = "cosine"
"""What a scheduler section without a name selects."""


class _Warmup(SchedulerConfig):
    warmup_steps: int = Field(0, ge=0, description="Linear warmup over this many optimizer steps.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Linear warmup over this fraction of the training steps.")

    @model_validator(mode="after")
    def _one_warmup(self):
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("set warmup_steps or warmup_ratio, not both")
        return self

    def warmup(self, ctx: ScheduleContext) -> int:
        return ctx.warmup_steps(self.warmup_steps, self.warmup_ratio)

    def check(self, ctx: ScheduleContext) -> None:
        """Refuse a warmup not shorter than the run (the entry's ``check``, for every schedule with a warmup)."""
        ctx.check_warmup(self.name, self.warmup_steps, self.warmup_ratio)

    def after_warmup(self, steps: int) -> str:
        """What the rate does over the ``steps`` after warmup, in a few words (the run header)."""
        return f"{self.name} for {steps} steps"


class LinearConfig(_Warmup):
    """Linear decay to 0 after warmup."""

    name: Literal["linear"] = "linear"

    def after_warmup(self, steps: int) -> str:
        return f"linear decay to 0 over {steps} steps"


class CosineConfig(_Warmup):
    """Cosine decay to 0 after warmup."""

    name: Literal["cosine"] = "cosine"
    num_cycles: float = Field(0.5, gt=0, description="Number of cosine waves (0.5: from the peak down to 0).")

    def after_warmup(self, steps: int) -> str:
        cycles = "" if self.num_cycles == 0.5 else f" ({self.num_cycles:g} cycles)"
        return f"cosine decay{cycles} to 0 over {steps} steps"


class CosineWithRestartsConfig(_Warmup):
    """Cosine decay with hard restarts."""

    name: Literal["cosine_with_restarts"] = "cosine_with_restarts"
    num_cycles: int = Field(1, ge=1, description="Number of hard restarts.")

    def after_warmup(self, steps: int) -> str:
        return f"cosine decay with {self.num_cycles} hard restart(s) over {steps} steps"


class PolynomialConfig(_Warmup):
    """Polynomial decay to ``lr_end``."""

    name: Literal["polynomial"] = "polynomial"
    lr_end: float = Field(1e-7, ge=0, description="Final learning rate.")
    power: float = Field(1.0, gt=0, description="Power of the polynomial.")

    def after_warmup(self, steps: int) -> str:
        return f"polynomial (power {self.power:g}) decay to {self.lr_end:g} over {steps} steps"


class ConstantConfig(SchedulerConfig):
    """Constant learning rate."""

    name: Literal["constant"] = "constant"


class ConstantWithWarmupConfig(_Warmup):
    """Constant learning rate after a linear warmup."""

    name: Literal["constant_with_warmup"] = "constant_with_warmup"

    def after_warmup(self, steps: int) -> str:
        return f"constant for {steps} steps"


class InverseSqrtConfig(_Warmup):
    """Inverse square-root decay after warmup."""

    name: Literal["inverse_sqrt"] = "inverse_sqrt"
    timescale: int | None = Field(None, gt=0, description="Time scale of the decay (default: the warmup steps).")

    def after_warmup(self, steps: int) -> str:
        return f"inverse square-root decay for {steps} steps"


class CosineWithMinLrConfig(_Warmup):
    """Cosine decay to a floor (``min_lr`` or ``min_lr_rate`` x the peak)."""

    name: Literal["cosine_with_min_lr"] = "cosine_with_min_lr"
    num_cycles: float = Field(0.5, gt=0)
    min_lr: float | None = Field(None, ge=0, description="Floor learning rate.")
    min_lr_rate: float | None = Field(0.1, ge=0, le=1, description="Floor as a fraction of the peak.")

    @model_validator(mode="after")
    def _one_floor(self):
        if self.min_lr is not None and "min_lr_rate" in self.model_fields_set:
            raise ValueError("set min_lr or min_lr_rate, not both")
        return self

    def after_warmup(self, steps: int) -> str:
        floor = f"{self.min_lr:g}" if self.min_lr is not None else f"{self.min_lr_rate:g} x lr"
        return f"cosine decay to {floor} over {steps} steps"


class CosineWarmupWithMinLrConfig(CosineWithMinLrConfig):
    """Cosine decay to a floor after a warmup that starts at ``warmup_lr_rate`` x the peak (not at 0)."""

    name: Literal["cosine_warmup_with_min_lr"] = "cosine_warmup_with_min_lr"  # type: ignore[assignment]
    warmup_lr_rate: float | None = Field(
        None, ge=0, le=1, description="Where warmup starts, as a fraction of the peak (default: 1 / warmup steps)."
    )


class GreedyConfig(SchedulerConfig):
    """GreedyLR (transformers): raise the rate while the evaluation metric improves, lower it while it does not.

    Like ``reduce_lr_on_plateau`` it steps on the evaluation metric, so the run needs evaluation.
    """

    name: Literal["greedy"] = "greedy"
    mode: Literal["min", "max"] = "min"
    factor: float = Field(0.95, gt=0, lt=1, description="Multiply (or divide) the rate by this.")
    patience: int = Field(10, ge=0)
    threshold: float = Field(1e-6, ge=0)
    threshold_mode: Literal["rel", "abs"] = "abs"
    cooldown: int = Field(0, ge=0)
    warmup: int = Field(0, ge=0, description="Evaluations during which the rate only increases.")
    min_lr: float = Field(1e-3, ge=0)
    max_lr: float = Field(1.0, gt=0)
    eps: float = Field(1e-8, ge=0)
    smooth: bool = Field(False, description="Smooth the metric over window_size evaluations.")
    window_size: int = Field(50, ge=1)
    reset_start: int = Field(500, ge=0)


class WarmupStableDecayConfig(_Warmup):
    """Warmup, a stable phase, then decay (WSD).

    The lengths come from the run's total steps unless given: decay ``decay_steps`` (default
    ``ceil(decay_ratio x total)``, 10%), stable what is left after warmup and decay (or
    ``stable_steps``; steps after warmup + stable + decay stay at the floor).
    """

    name: Literal["warmup_stable_decay"] = "warmup_stable_decay"
    decay_ratio: float = Field(0.1, gt=0, le=1, description="Fraction of the training steps spent decaying.")
    decay_steps: int | None = Field(None, ge=1, description="Decay steps (instead of decay_ratio).")
    stable_steps: int | None = Field(
        None, ge=0, description="Stable steps (default: the total minus warmup and decay)."
    )
    warmup_type: Literal["linear", "cosine", "1-sqrt"] = "linear"
    decay_type: Literal["linear", "cosine", "1-sqrt"] = "cosine"
    min_lr_ratio: float = Field(
        0.0, ge=0, le=1, description="Floor as a fraction of the peak: where warmup starts and decay ends."
    )
    num_cycles: float = Field(0.5, gt=0)

    @model_validator(mode="after")
    def _one_decay_length(self):
        if self.decay_steps is not None and "decay_ratio" in self.model_fields_set:
            raise ValueError("set decay_steps or decay_ratio, not both")
        return self

    def check(self, ctx: ScheduleContext) -> None:
        self.lengths(ctx)  # warmup and decay fit in the run; with stable_steps given, the warmup alone must
        super().check(ctx)

    def lengths(self, ctx: ScheduleContext) -> tuple[int, int, int]:
        """``(warmup, stable, decay)`` steps for this run."""
        import math

        warmup = self.warmup(ctx)
        if self.decay_steps is not None:
            decay = self.decay_steps
        else:
            decay = math.ceil(self.decay_ratio * ctx.num_training_steps)
        stable = self.stable_steps if self.stable_steps is not None else ctx.num_training_steps - warmup - decay
        if stable < 0:
            raise ConfigError(
                f"scheduler 'warmup_stable_decay': warmup ({warmup}) and decay ({decay}) steps exceed the run's "
                f"{ctx.num_training_steps} steps: shorten them or train longer"
            )
        return warmup, stable, decay


class ReduceLROnPlateauConfig(SchedulerConfig):
    """Reduce the learning rate when the evaluation metric stops improving (needs evaluation)."""

    name: Literal["reduce_lr_on_plateau"] = "reduce_lr_on_plateau"
    mode: Literal["min", "max"] = "min"
    factor: float = Field(0.1, gt=0, lt=1)
    patience: int = Field(10, ge=0)
    threshold: float = Field(1e-4, ge=0)
    min_lr: float = Field(0.0, ge=0)


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
            config=LinearConfig,
            describe=describe_warmup,
            check=check_warmup,
            build=build_linear,
            summary="linear decay to 0 after warmup",
        )
    )
    register(
        SchedulerEntry(
            config=CosineConfig,
            describe=describe_warmup,
            check=check_warmup,
            build=build_cosine,
            summary="cosine decay to 0 after warmup",
        )
    )
    register(
        SchedulerEntry(
            config=CosineWithRestartsConfig,
            describe=describe_warmup,
            check=check_warmup,
            build=build_cosine_with_restarts,
            summary="cosine with hard restarts",
        )
    )
    register(
        SchedulerEntry(
            config=PolynomialConfig,
            describe=describe_warmup,
            check=check_warmup,
            build=build_polynomial,
            summary="polynomial decay to lr_end",
        )
    )
    register(
        SchedulerEntry(
            config=ConstantConfig,
            describe=describe_constant,
            build=build_constant,
            summary="constant learning rate",
            cooldown=own_cooldown,
        )
    )
    register(
        SchedulerEntry(
            config=ConstantWithWarmupConfig,
            cooldown=own_cooldown,
            describe=describe_warmup,
            check=check_warmup,
            build=build_constant_with_warmup,
            summary="constant after warmup",
        )
    )
    register(
        SchedulerEntry(
            config=InverseSqrtConfig,
            describe=describe_warmup,
            check=check_warmup,
            build=build_inverse_sqrt,
            summary="inverse square-root decay",
        )
    )
    register(
        SchedulerEntry(
            config=CosineWithMinLrConfig,
            describe=describe_warmup,
            check=check_warmup,
            build=build_cosine_with_min_lr,
            summary="cosine decay to a floor",
        )
    )
    register(
        SchedulerEntry(
            config=WarmupStableDecayConfig,
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
            config=ReduceLROnPlateauConfig,
            describe=describe_plateau,
            build=build_plateau,
            summary="reduce on plateau of the eval metric",
        )
    )
    register(
        SchedulerEntry(
            config=CosineWarmupWithMinLrConfig,
            describe=describe_warmup,
            check=check_warmup,
            build=build_cosine_warmup_with_min_lr,
            summary="cosine decay to a floor, warmup from a floor",
        )
    )
    register(
        SchedulerEntry(
            config=GreedyConfig,
            describe=describe_greedy,
            build=build_greedy,
            summary="GreedyLR: follows the eval metric",
        )
    )
