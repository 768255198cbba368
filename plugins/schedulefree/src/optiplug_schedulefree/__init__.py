"""optiplug-schedulefree: schedule-free AdamW, SGD and RAdam (the ``schedulefree`` package) as optiplug optimizers.

``schedule_free_adamw``, ``schedule_free_sgd`` and ``schedule_free_radam`` (transformers' names)
bring with them what the Trainer gets wrong: every saved model (each checkpoint, the output
directory) holds the averaged weights x, saving and evaluating never change the training run,
resume is exact and ``weights_only``-safe, and a learning-rate schedule on top of the optimizer's
own warmup is refused. Importing this module does not import torch.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import optiplug
from optiplug_schedulefree.engines import NVME

if TYPE_CHECKING:
    from optiplug_schedulefree.config import (
        ScheduleFreeAdamWConfig,
        ScheduleFreeConfig,
        ScheduleFreeRAdamConfig,
        ScheduleFreeSGDConfig,
    )

__all__ = [
    "ScheduleFreeAdamWConfig",
    "ScheduleFreeRAdamConfig",
    "ScheduleFreeSGDConfig",
    "check_deepspeed",
    "register_optimizers",
]
__version__ = "0.1.0"

CONFIGS = "optiplug_schedulefree.config"  # imported when a config is first read, not by `optiplug list`
__getattr__ = optiplug.lazy_attributes(
    __name__,
    CONFIGS,
    ["ScheduleFreeAdamWConfig", "ScheduleFreeConfig", "ScheduleFreeRAdamConfig", "ScheduleFreeSGDConfig"],
)


def build(ctx: optiplug.BuildContext, cfg: ScheduleFreeConfig) -> Any:
    """Build the schedule-free optimizer ``cfg`` names (an exact-switch subclass of schedulefree's)."""
    from optiplug_schedulefree.optim import build_schedule_free

    return build_schedule_free(ctx, cfg)


def scheduler_name(ctx: optiplug.BuildContext) -> str | None:
    """The learning-rate scheduler the run will use: the OptiTrainer's scheduler section, else
    ``TrainingArguments.lr_scheduler_type`` (what a plain Trainer builds), else None (no trainer)."""
    config = ctx.scheduler_config
    if config is not None:
        return str(config.name)
    if ctx.args is not None:
        kind = ctx.args.lr_scheduler_type
        return str(getattr(kind, "value", kind))
    return None


def check(ctx: optiplug.BuildContext, cfg: ScheduleFreeConfig) -> None:
    """Refuse, before the first step, what schedule-free cannot train here (each with what to change)."""
    name = cfg.name
    warmup = "RAdam's rectification" if name == "schedule_free_radam" else "optimizer.warmup_steps"
    schedule = scheduler_name(ctx)
    if schedule is not None and schedule != "constant":
        raise optiplug.ConfigError(
            f"{name}: the learning-rate scheduler must be 'constant', not {schedule!r}: schedule-free needs no "
            f"schedule and warms up by itself ({warmup}), so another scheduler would change the learning rate a second "
            "time; "
            "set scheduler.name to constant"
        )
    args = ctx.args
    # TrainingArguments.optim=schedule_free_adamw/sgd hands the Trainer's warmup_steps to the optimizer: taken once
    own_warmup = getattr(cfg, "warmup_steps", 0)
    took_warmup = args is not None and bool(own_warmup) and own_warmup == args.warmup_steps
    trainer_warmup = args is not None and (getattr(args, "warmup_steps", None) or getattr(args, "warmup_ratio", None))
    if trainer_warmup and not took_warmup:
        raise optiplug.ConfigError(
            f"{name}: the Trainer's warmup_steps/warmup_ratio are set, and the constant scheduler ignores them: the "
            f"optimizer warms up by itself ({warmup}); set the Trainer's warmup to 0"
        )
    if ctx.distributed == "deepspeed":
        check_deepspeed(name, ctx.deepspeed_config or {}, ctx.args)


def _enabled(config: dict[str, Any], key: str, args: Any) -> bool:
    """DeepSpeed's ``fp16``/``bf16`` section is on (``"auto"``: as the Trainer's argument of the same name says)."""
    enabled = config.get(key, {}).get("enabled", False)
    return bool(getattr(args, key, False)) if enabled == "auto" else bool(enabled)


def check_deepspeed(name: str, config: dict[str, Any], args: Any) -> None:
    """Refuse the DeepSpeed set-ups whose copy of the weights the switch cannot reach (ZeRO stages 1-3 train).

    Schedule-free is elementwise, so DeepSpeed's flat partitions change nothing in its step; what matters is
    that every switch between y and x reaches the model's weights (see :mod:`optiplug_schedulefree.engines`).
    """
    zero = config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    if stage == 0 and (_enabled(config, "fp16", args) or _enabled(config, "bf16", args)):
        raise optiplug.ConfigError(
            f"{name}: DeepSpeed ZeRO stage 0 with fp16/bf16 steps fp32 master weights that the switch between the "
            "training point y and the saved weights x cannot reach: set zero_optimization.stage to 1, 2 or 3"
        )
    if zero.get("elastic_checkpoint"):
        raise optiplug.ConfigError(
            f"{name}: DeepSpeed's elastic_checkpoint saves only the per-parameter state tensors, not schedule-free's "
            "per-group averaging weights and step count, so a resumed run would restart its average: set "
            "zero_optimization.elastic_checkpoint to false"
        )
    nvme = [key for key in ("offload_optimizer", "offload_param") if (zero.get(key) or {}).get("device") == "nvme"]
    if nvme:
        raise optiplug.ConfigError(f"{name}: {NVME} (zero_optimization.{nvme[0]}.device is nvme)")


def callbacks(cfg: ScheduleFreeConfig) -> list[Any]:
    """The callback that wires the switch through the engine and leaves the model at x when training ends."""
    from optiplug_schedulefree.callback import ScheduleFreeCallback

    return [ScheduleFreeCallback(cfg.name)]


def _saving_x(trainer: Any, original: Any) -> Any:
    from optiplug_schedulefree.callback import saving_x

    return saving_x(trainer, original)


def _x_before_loading_best(trainer: Any, original: Any) -> Any:
    from optiplug_schedulefree.callback import x_before_loading_best

    return x_before_loading_best(trainer, original)


def patches(cfg: ScheduleFreeConfig) -> list[optiplug.Patch]:
    """The trainer's ``save_model`` writes x; ``_load_best_model`` keeps y aside before loading the best x."""
    return [
        optiplug.Patch(
            target="",
            attribute="save_model",
            make=_saving_x,
            reason=f"{cfg.name}: every checkpoint and the output directory hold x (eval mode around the save; y "
            "restored bit for bit)",
        ),
        optiplug.Patch(
            target="",
            attribute="_load_best_model",
            make=_x_before_loading_best,
            reason=f"{cfg.name}: keep y aside before load_best_model_at_end writes the best x into the model",
        ),
    ]


def state_bytes(shapes: Sequence[optiplug.ParamShape], cfg: ScheduleFreeConfig) -> int:
    """Per parameter: z, y (in the state dict; aside while the model holds x) and, for AdamW and RAdam, the
    second moment. No per-parameter step (the step count is in the parameter groups)."""
    buffers = 2 if cfg.name == "schedule_free_sgd" else 3
    return optiplug.moment_bytes(shapes, buffers, scalars=0)


def transformers_arguments(
    args: Any, optim_args: Mapping[str, str], *, take: tuple[str, ...], warmup: bool
) -> dict[str, Any]:
    """What transformers' Trainer builds for ``optim="schedule_free_*"``: the learning rate, weight decay (and the
    Adam betas and eps for AdamW and RAdam), ``TrainingArguments.warmup_steps`` as the optimizer's own warmup (not
    for RAdam), and ``weight_lr_power`` and ``r`` from ``optim_args``."""
    fields = optiplug.transformers_fields(args, optim_args, take=take, only=("weight_lr_power", "r"))
    steps = getattr(args, "warmup_steps", 0) or 0
    if warmup and steps:
        if steps < 1:
            raise optiplug.ConfigError(
                f"warmup_steps={steps} is a fraction of the run, which transformers' Trainer hands to the "
                "schedule-free optimizer as a step count (a rate 1/fraction times too high on the first step): give "
                "warmup_steps as a number of steps"
            )
        fields["warmup_steps"] = int(steps)
    return fields


_ADAM = ("learning_rate", "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay")
_TRANSFORMERS = {
    "schedule_free_adamw": functools.partial(transformers_arguments, take=_ADAM, warmup=True),
    "schedule_free_sgd": functools.partial(transformers_arguments, take=("learning_rate", "weight_decay"), warmup=True),
    "schedule_free_radam": functools.partial(transformers_arguments, take=_ADAM, warmup=False),
}
"""transformers' names are the entries' own: each an alias with transformers' arguments."""


def _entry(name: str, config: str, summary: str) -> optiplug.OptimizerEntry:
    return optiplug.OptimizerEntry(
        config=optiplug.LazyConfig.from_module(name, f"{CONFIGS}:{config}"),
        build=build,
        summary=summary,
        callbacks=callbacks,
        patches=patches,
        check=check,
        requires=("schedulefree",),
        state_bytes=state_bytes,
        default_scheduler="constant",  # schedule-free is its own schedule: a run naming none gets constant
        aliases=(optiplug.Alias(name, transformers=True, arguments=_TRANSFORMERS[name]),),
    )


@optiplug.hookimpl
def register_optimizers(register: Any) -> None:
    register(
        _entry(
            "schedule_free_adamw",
            "ScheduleFreeAdamWConfig",
            "Schedule-free AdamW (schedulefree): saves x, exact resume",
        )
    )
    register(
        _entry("schedule_free_sgd", "ScheduleFreeSGDConfig", "Schedule-free SGD (schedulefree): saves x, exact resume")
    )
    register(
        _entry(
            "schedule_free_radam",
            "ScheduleFreeRAdamConfig",
            "Schedule-free RAdam (schedulefree): saves x, exact resume",
        )
    )
