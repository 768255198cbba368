"""Hook specifications: what a plugin may implement. Mark implementations with ``@optiplug.hookimpl``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # only for type checkers: importing optiplug must not import transformers
    from transformers import Trainer, TrainerCallback

    from optiplug.entries import OptimizerEntry, SchedulerEntry

hookspec = pluggy.HookspecMarker("optiplug")
hookimpl = pluggy.HookimplMarker("optiplug")


@hookspec
def register_optimizers(register: Callable[[OptimizerEntry], None]) -> None:
    """Register optimizers by calling ``register(OptimizerEntry(...))`` once per optimizer."""


@hookspec
def register_schedulers(register: Callable[[SchedulerEntry], None]) -> None:
    """Register learning-rate schedulers by calling ``register(SchedulerEntry(...))`` once per scheduler."""


@hookspec
def trainer_callbacks(trainer: Trainer, config: Any) -> list[TrainerCallback] | None:
    """Return callbacks for every optiplug trainer, whatever the optimizer (``config``: the trainer's run_config)."""
