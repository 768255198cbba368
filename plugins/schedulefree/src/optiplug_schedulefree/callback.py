"""What schedule-free needs around the Trainer: x in every saved model, x after training.

transformers calls ``optimizer.train()`` before every training step and ``optimizer.eval()``
before evaluation, never before saving, so its checkpoints hold the training point y. The
plugin's patch wraps the trainer's ``save_model`` (which writes every checkpoint's weights and
the output directory) in ``eval()``/``train()``; with the plugin's exact switch the run goes on
bit for bit as if nothing was saved. Its callback puts the model at x when training ends, so a
``save_model``, ``evaluate`` or ``push_to_hub`` after ``train()`` sees x too; when training begins,
it finds the engine around the optimizer (DeepSpeed's ZeRO optimizer steps fp32 copies of the
weights) so that the switch reaches the model's weights (:mod:`optiplug_schedulefree.engines`).
"""

from __future__ import annotations

import functools
from typing import Any

from transformers import TrainerCallback

import optiplug
from optiplug_schedulefree.engines import engine_weights
from optiplug_schedulefree.optim import schedule_free_optimizer


class ScheduleFreeCallback(TrainerCallback):
    """Wire the switch through the engine when training begins; at the end of training, switch the model to x
    (the optimizer to eval mode); the next step switches back."""

    def __init__(self, name: str = "schedule-free") -> None:
        self.name = name

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        wrapped = kwargs.get("optimizer")
        optimizer = schedule_free_optimizer(wrapped)
        if optimizer is not None:
            holder = optiplug.unwrap_optimizer(wrapped, until=lambda o: getattr(o, "optimizer", None) is optimizer)
            optimizer.engine = engine_weights(self.name, None if _is_accelerate(holder) else holder)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        optimizer = schedule_free_optimizer(kwargs.get("optimizer"))
        if optimizer is not None:
            optimizer.eval()


def saving_x(trainer: Any, original: Any) -> Any:
    """``trainer.save_model`` that writes x: eval mode for the save, then back to the exact y."""

    @functools.wraps(original)
    def save_model(*args: Any, **kwargs: Any) -> Any:
        optimizer = schedule_free_optimizer(trainer.optimizer)
        if optimizer is None or not optimizer.in_train_mode:
            return original(*args, **kwargs)
        optimizer.eval()
        try:
            return original(*args, **kwargs)
        finally:
            optimizer.train()

    return save_model


def x_before_loading_best(trainer: Any, original: Any) -> Any:
    """``trainer._load_best_model`` that first switches to eval mode, so y is kept aside before the best x
    overwrites the weights (an ``eval()`` afterwards would otherwise treat the loaded x as y)."""

    @functools.wraps(original)
    def load_best_model(*args: Any, **kwargs: Any) -> Any:
        optimizer = schedule_free_optimizer(trainer.optimizer)
        if optimizer is not None:
            optimizer.eval()
        return original(*args, **kwargs)

    return load_best_model


def _is_accelerate(holder: Any) -> bool:
    """accelerate's wrappers (``AcceleratedOptimizer`` and its DeepSpeed subclass) hold no weights of their own."""
    return holder is None or type(holder).__module__.startswith("accelerate.")
