"""Build optimizers and schedulers from configs, with or without a Trainer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from optiplug.configs import OptimizerConfig, SchedulerConfig
from optiplug.context import BuildContext, ScheduleContext
from optiplug.entries import OptimizerEntry
from optiplug.errors import ConfigError, MissingDependencyError, OptiplugError, PluginError
from optiplug.helpers import unwrap_optimizer
from optiplug.layerwise import check_layerwise, enable_layerwise, release_parameters
from optiplug.matrices import check_built_for_fsdp2
from optiplug.offload import check_offload, offloaded
from optiplug.params import apply_group_rules
from optiplug.registry import get_entry, get_scheduler_entry, parse_optimizer, parse_scheduler

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["build_from_entry", "build_optimizer", "build_scheduler", "check_param_groups"]


@contextlib.contextmanager
def _missing_modules_named(kind: str, name: str, requires: tuple[str, ...]) -> Iterator[None]:
    try:
        yield
    except ModuleNotFoundError as error:
        package = requires[0] if requires else (error.name or "").split(".")[0]
        raise MissingDependencyError(
            f"{kind} {name!r} needs the module {error.name!r}, which is not installed: pip install '{package}'"
        ) from error


def _plugin_of(kind: str, name: str) -> str:
    from optiplug.registry import registry

    try:
        return registry.lookup(kind, name).plugin
    except OptiplugError:
        return "(not registered)"


def _built(kind: str, entry: Any, ctx: Any, cfg: Any) -> Any:
    """``entry.build(ctx, cfg)``; an exception that is not optiplug's is named by the plugin and the entry."""
    try:
        return entry.build(ctx, cfg)
    except (OptiplugError, ModuleNotFoundError):
        raise
    except Exception as error:
        cause = (str(error).strip().splitlines() or [""])[0]
        raise PluginError(
            f"{kind} {entry.name!r} (plugin {_plugin_of(kind, entry.name)!r}) failed to build: "
            f"{type(error).__name__}: {cause}"
        ) from error


NO_TRAINABLE_PARAMETERS = (
    "the model has no trainable parameters (every parameter has requires_grad=False); "
    "check finetuning.trainable or finetuning.target_modules, or unfreeze some parameters"
)


def require_trainable(ctx: BuildContext) -> None:
    """Raise :class:`ConfigError` when the model has no parameter to train (before an entry's check or build)."""
    if not ctx.named_parameters():
        raise ConfigError(NO_TRAINABLE_PARAMETERS)


class _StepsUnknown(ScheduleContext):
    """A ScheduleContext without a step count: a scheduler that reads it is told to pass one."""

    def __getattribute__(self, name: str) -> Any:
        if name == "num_training_steps":
            scheduler = object.__getattribute__(self, "scheduler_name")
            raise ConfigError(
                f"scheduler {scheduler!r} needs num_training_steps > 0: pass "
                f"build_scheduler(optimizer, {scheduler!r}, num_training_steps=TOTAL_STEPS)"
            )
        return super().__getattribute__(name)

    def warmup_steps(self, steps: int = 0, ratio: float = 0.0) -> int:
        return int(steps) if steps and steps > 0 else 0 if not ratio else super().warmup_steps(steps, ratio)


def build_from_entry(entry: OptimizerEntry, ctx: BuildContext, cfg: OptimizerConfig, *, check: bool = True):
    """Check requirements and run the entry's ``check`` and the core's, then call its factory.

    ``check=False`` skips the checks: the caller (the trainer) ran them already. With
    ``layerwise: true`` the optimizer the factory returns is made layerwise (:mod:`optiplug.layerwise`).
    """
    require_trainable(ctx)
    if check:
        entry.check_requires()
    with _missing_modules_named("optimizer", entry.name, entry.requires):
        if check and entry.check is not None:
            entry.check(ctx, cfg)
        if check:
            check_layerwise(entry, ctx, cfg)
            check_offload(entry, ctx, cfg)
        rules = tuple(getattr(cfg, "param_groups", ()))
        ctx.param_group_rules = rules
        optimizer = _built("optimizer", entry, ctx, cfg)
        check_built_for_fsdp2(entry, optimizer, ctx)
        apply_group_rules(optimizer, rules, ctx._rule_of, entry.name)
    if getattr(cfg, "offload", "none") == "cpu":
        return offloaded(optimizer)
    if getattr(cfg, "layerwise", False):
        enable_layerwise(optimizer, ctx)
    else:
        release_parameters(optimizer)  # a layerwise optimizer built before on these parameters stops stepping them
    return optimizer


def check_param_groups(ctx: BuildContext, cfg: OptimizerConfig) -> None:
    """Raise :class:`ConfigError` when an ``optimizer.param_groups`` entry takes no parameter of ``ctx.model``."""
    rules = tuple(getattr(cfg, "param_groups", ()))
    if rules:
        BuildContext(model=ctx.model, trainer=ctx.trainer, args=ctx.args, param_group_rules=rules).param_groups()


def build_optimizer(model: nn.Module, config: OptimizerConfig | str | dict | None = None, **fields: Any):
    """Build a registered optimizer for ``model``'s trainable parameters, in any training loop.

    Args:
        model: the model.
        config: an optimizer config, a registered name, a mapping with ``name``, or None for the default.
        **fields: config fields overriding ``config``'s (``lr=1e-3``).

    Returns:
        The optimizer (a ``torch.optim.Optimizer``).

    Raises:
        UnknownNameError, ConfigError, MissingDependencyError.
    """
    if not callable(getattr(model, "named_parameters", None)):
        raise ConfigError(
            f"build_optimizer needs the model (a torch.nn.Module) first, got {type(model).__name__}: "
            "build_optimizer(model, 'adamw', lr=1e-3)"
        )
    cfg = parse_optimizer(config, **fields)
    entry = get_entry(cfg.name)
    return build_from_entry(entry, BuildContext(model=model), cfg)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    config: SchedulerConfig | str | dict | None = None,
    num_training_steps: int = 0,
    **fields: Any,
):
    """Build a registered learning-rate scheduler on ``optimizer`` (unwrapped from accelerate first).

    Args:
        optimizer: the optimizer whose learning rates the scheduler sets.
        config: a scheduler config, a registered name, a mapping with ``name``, or None for the default.
        num_training_steps: total optimizer steps of the run; a scheduler that needs it (every decaying
            schedule) refuses 0.
        **fields: config fields overriding ``config``'s (``warmup_steps=100``).

    Raises:
        UnknownNameError, ConfigError (also for a missing ``num_training_steps``), MissingDependencyError,
        PluginError (the entry's factory raised).
    """
    cfg = parse_scheduler(config, **fields)
    entry = get_scheduler_entry(cfg.name)
    entry.check_requires()
    steps = int(num_training_steps)
    if steps < 0:
        raise ConfigError(f"num_training_steps: expected a positive number of steps (got {steps})")
    raw = unwrap_optimizer(optimizer)
    if steps > 0:
        ctx = ScheduleContext(optimizer=raw, num_training_steps=steps)
    else:
        ctx = _StepsUnknown(optimizer=raw, num_training_steps=0)
        ctx.scheduler_name = entry.name  # type: ignore[attr-defined]
    with _missing_modules_named("scheduler", entry.name, entry.requires):
        return _built("scheduler", entry, ctx, cfg)
