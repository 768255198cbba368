"""Build optimizers and schedulers from configs, with or without a Trainer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from optiplug.configs import OptimizerConfig, SchedulerConfig
from optiplug.context import BuildContext, ScheduleContext
from optiplug.entries import OptimizerEntry
from optiplug.errors import MissingDependencyError
from optiplug.helpers import unwrap_optimizer
from optiplug.layerwise import check_layerwise, enable_layerwise
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


def build_from_entry(entry: OptimizerEntry, ctx: BuildContext, cfg: OptimizerConfig, *, check: bool = True):
    """Check requirements and run the entry's ``check`` and the core's, then call its factory.

    ``check=False`` skips the checks: the caller (the trainer) ran them already. With
    ``layerwise: true`` the optimizer the factory returns is made layerwise (:mod:`optiplug.layerwise`).
    """
    if check:
        entry.check_requires()
    with _missing_modules_named("optimizer", entry.name, entry.requires):
        if check and entry.check is not None:
            entry.check(ctx, cfg)
        if check:
            check_layerwise(entry, ctx, cfg)
        rules = tuple(getattr(cfg, "param_groups", ()))
        ctx.param_group_rules = rules
        optimizer = entry.build(ctx, cfg)
        apply_group_rules(optimizer, rules, ctx._rule_of, entry.name)
    if getattr(cfg, "layerwise", False):
        enable_layerwise(optimizer, ctx)
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
        num_training_steps: total optimizer steps of the run.
        **fields: config fields overriding ``config``'s (``warmup_steps=100``).
    """
    cfg = parse_scheduler(config, **fields)
    entry = get_scheduler_entry(cfg.name)
    entry.check_requires()
    ctx = ScheduleContext(optimizer=unwrap_optimizer(optimizer), num_training_steps=int(num_training_steps))
    with _missing_modules_named("scheduler", entry.name, entry.requires):
        return entry.build(ctx, cfg)
