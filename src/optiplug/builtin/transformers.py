"""transformers' own optimizer and schedule: ``adafactor`` (transformers.optimization.Adafactor) and the
``adafactor`` scheduler (its ``AdafactorSchedule``), and the install hints for transformers' names.

``adafactor``'s defaults are what ``TrainingArguments(optim="adafactor")`` builds: an external
learning rate (``relative_step=False``, ``scale_parameter=False``). With ``relative_step: true``
Adafactor computes its own rate; the run must then use the ``adafactor`` scheduler, which only
reports that rate (any other schedule would be silently ignored, so it is refused). Both config classes live in
``optiplug.builtin.configs``, imported when a config is first read (not by ``optiplug list``), and are still
importable from here.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from optiplug.builtin import CONFIGS, lazy_config
from optiplug.context import BuildContext, ParamShape, ScheduleContext
from optiplug.entries import Alias, OptimizerEntry, SchedulerEntry, lazy_attributes
from optiplug.errors import ConfigError
from optiplug.hookspecs import hookimpl
from optiplug.matrices import check_whole_matrices
from optiplug.state_sizes import STEP_BYTES
from optiplug.transformers_args import transformers_fields

if TYPE_CHECKING:
    from optiplug.builtin.configs import AdafactorConfig, AdafactorScheduleConfig

__getattr__ = lazy_attributes(__name__, CONFIGS, ["AdafactorConfig", "AdafactorScheduleConfig"])


def build_adafactor(ctx: BuildContext, cfg: AdafactorConfig):
    from transformers.optimization import Adafactor

    return Adafactor(
        ctx.param_groups(cfg.weight_decay),
        lr=cfg.lr,
        eps=cfg.eps,
        clip_threshold=cfg.clip_threshold,
        decay_rate=cfg.decay_rate,
        beta1=cfg.beta1,
        scale_parameter=cfg.scale_parameter,
        relative_step=cfg.relative_step,
        warmup_init=cfg.warmup_init,
    )


def check_adafactor(ctx: BuildContext, cfg: AdafactorConfig) -> None:
    # row and column means and RMS of each weight: a flat partition or a row shard is not the weight (under FSDP2
    # transformers' Adafactor also fails at its first step, mixing a DTensor with the plain tensor of a mean)
    check_whole_matrices(
        ctx, "adafactor", "keeps row and column second moments of each weight matrix and scales by its RMS", fsdp2=False
    )
    schedule = getattr(ctx.scheduler_config, "name", None)
    if cfg.relative_step and schedule not in (None, "adafactor"):
        raise ConfigError(
            f"adafactor with relative_step: true computes its own learning rate, so the scheduler {schedule!r} would "
            "be ignored: set scheduler.name to adafactor (it reports Adafactor's rate)"
        )
    if not cfg.relative_step and schedule == "adafactor":
        raise ConfigError(
            "the adafactor scheduler reports the rate Adafactor computes with relative_step: true; with an external "
            "lr choose another scheduler, or set optimizer.relative_step: true and optimizer.lr: null"
        )


def adafactor_state_bytes(shapes: Sequence[ParamShape], cfg: AdafactorConfig) -> int:
    """Per parameter: a row and a column average for matrices (a full average for vectors), a first moment with
    ``beta1``; in the parameter's dtype; and the parameter's RMS, a float32 scalar tensor (the step is an int)."""
    total = 0
    for s in shapes:
        if len(s.shape) >= 2:
            rows = math.prod(s.shape[:-1])
            cols = math.prod(s.shape[:-2]) * s.shape[-1]
            total += (rows + cols) * s.itemsize
        else:
            total += s.numel * s.itemsize
        if cfg.beta1 is not None:
            total += s.numel * s.itemsize
        total += STEP_BYTES
    return total


def build_adafactor_schedule(ctx: ScheduleContext, cfg: AdafactorScheduleConfig):
    from transformers.optimization import Adafactor, AdafactorSchedule

    if not isinstance(ctx.optimizer, Adafactor) or not all(g["relative_step"] for g in ctx.optimizer.param_groups):
        raise ConfigError(
            "scheduler 'adafactor' reports the rate of the adafactor optimizer with relative_step: true; "
            f"the optimizer is {type(ctx.optimizer).__name__}: choose another scheduler"
        )
    return AdafactorSchedule(ctx.optimizer, initial_lr=cfg.initial_lr)


@hookimpl
def register_optimizers(register):
    register(
        OptimizerEntry(
            config=lazy_config("adafactor", "AdafactorConfig"),
            build=build_adafactor,
            summary="Adafactor, transformers (external lr by default, as TrainingArguments builds it)",
            check=check_adafactor,
            aliases=(
                Alias(
                    "adafactor",
                    transformers=True,
                    arguments=functools.partial(transformers_fields, take=("learning_rate", "weight_decay")),
                ),
            ),
            state_bytes=adafactor_state_bytes,
            per_parameter=True,
        )
    )


@hookimpl
def register_schedulers(register):
    register(
        SchedulerEntry(
            config=lazy_config("adafactor", "AdafactorScheduleConfig"),
            build=build_adafactor_schedule,
            summary="the rate Adafactor computes (relative_step)",
        )
    )


# ---- transformers' TrainingArguments.optim names that no installed plugin maps ---------------------------------

_INSTALL = {
    "optiplug-bitsandbytes": (
        "adamw_bnb_8bit adamw_8bit paged_adamw_32bit paged_adamw_8bit ademamix ademamix_8bit paged_ademamix_32bit "
        "paged_ademamix_8bit lion_8bit lion_32bit paged_lion_32bit paged_lion_8bit rmsprop_bnb rmsprop_bnb_8bit "
        "rmsprop_bnb_32bit"
    ),
    "optiplug-torchao": "adamw_torch_4bit adamw_torch_8bit",
    "optiplug-galore": "galore_adamw galore_adamw_8bit galore_adafactor galore_adamw_layerwise "
    "galore_adamw_8bit_layerwise galore_adafactor_layerwise",
    "optiplug-apollo": "apollo_adamw apollo_adamw_layerwise",
    "optiplug-schedulefree": "schedule_free_adamw schedule_free_sgd schedule_free_radam",
    "optiplug-lomo": "lomo adalomo",
    "optiplug-grokadamw": "grokadamw",
    "optiplug-optimi": "stable_adamw",
}
_REFUSED = {
    "adamw_torch_xla": "is torch_xla's AdamW for TPUs, and torch_xla is not installed: use adamw_torch_fused",
    "adamw_torch_npu_fused": "is torch_npu's fused AdamW for Ascend NPUs, and torch_npu is not installed: use "
    "adamw_torch_fused",
    "adamw_anyprecision": "needs torchdistx's AnyPrecisionAdamW, which is not installable from PyPI: use "
    "adamw_torch_fused (or bf16 moments with another optimizer)",
}


def knows_transformers_name(name: str) -> bool:
    """Whether ``name`` is a ``TrainingArguments.optim`` value this table refuses or sends to a plugin."""
    return name in _REFUSED or any(name in names.split() for names in _INSTALL.values())


def transformers_hint(name: str, plugin: str | None = None) -> str:
    """One line for a ``TrainingArguments.optim`` name no installed entry maps: what to install or use instead."""
    head = f"TrainingArguments.optim={name!r}"
    if name in _REFUSED:
        return f"{head} {_REFUSED[name]}"
    if plugin is not None:
        return (
            f"{head}: plugin {plugin!r} registers {name!r} but declares no transformers mapping for it (transformers' "
            f"Trainer builds it with other defaults); select it explicitly: optimizer={{'name': {name!r}, ...}}"
        )
    for distribution, names in _INSTALL.items():
        if name in names.split():
            try:
                importlib.metadata.distribution(distribution)
            except importlib.metadata.PackageNotFoundError:
                return f"{head} needs the plugin {distribution}: pip install {distribution}"
            return (
                f"{head}: plugin {distribution!r} is installed but declares no transformers mapping for {name!r} "
                "(transformers' Trainer builds it with other defaults); select its optimizer explicitly (optiplug list)"
            )
    return (
        f"{head} is not mapped by any installed optiplug plugin: select an optimizer explicitly "
        "(optimizer=NAME; `optiplug list`), or train with transformers.Trainer"
    )
