"""What schedule-free needs around the Trainer: x in every saved model, x after training.

transformers calls ``optimizer.train()`` before every training step and ``optimizer.eval()``
before evaluation, never before saving, so its checkpoints hold the training point y. The
plugin's patch wraps the trainer's ``save_model`` (which writes every checkpoint's weights and
the output directory) in ``eval()``/``train()``; with the plugin's exact switch the run goes on
bit for bit as if nothing was saved. Its callback puts the model at x when training ends, so a
``save_model``, ``evaluate`` or ``push_to_hub`` after ``train()`` sees x too.
"""

from __future__ import annotations

import functools
from typing import Any

from transformers import TrainerCallback

from optiplug_schedulefree.optim import schedule_free_optimizer


class ScheduleFreeCallback(TrainerCallback):
    """At the end of training, switch the model to x (the optimizer to eval mode); the next step switches back."""

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
