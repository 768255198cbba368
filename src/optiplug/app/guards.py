"""The app's Trainer: :class:`~optiplug.OptiTrainer` plus the run's guards (imports torch and transformers).

* A non-finite loss or gradient norm stops the run before the optimizer applies it
  (:class:`~optiplug.app.safety.DivergedError`). This belongs to ``optiplug train``, not to
  the mixin: a Python-API user keeps transformers' own behaviour (``logging_nan_inf_filter``)
  and may add :class:`DivergenceCallback` to a :class:`GuardedTrainer` of their own.
* Every checkpoint records the optimizer and scheduler config it was trained with
  (:data:`~optiplug.app.safety.CHECKPOINT_RECORD`), which a resume compares.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from optiplug.app.safety import CHECKPOINT_RECORD, DivergedError, last_checkpoint
from optiplug.trainer import OptiTrainer

__all__ = ["CheckpointRecordCallback", "DivergenceCallback", "GuardedTrainer"]


class GuardedTrainer(OptiTrainer):
    """OptiTrainer that notes, per optimizer step, whether a loss was non-finite and the gradient norm."""

    optiplug_step_loss_finite: bool = True
    optiplug_step_loss: float = 0.0
    optiplug_grad_norm: float | None = None
    optiplug_cooldown: Any = None  # a cooldown's Branch: its schedule replaces the configured one

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None):
        if self.lr_scheduler is None and self.optiplug_cooldown is not None:
            from optiplug.helpers import unwrap_optimizer

            self.lr_scheduler = self.optiplug_cooldown.scheduler(unwrap_optimizer(optimizer or self.optimizer))
            self._created_lr_scheduler = True
            return self.lr_scheduler
        return super().create_scheduler(num_training_steps, optimizer)

    def training_step(self, *args: Any, **kwargs: Any):
        loss = super().training_step(*args, **kwargs)
        value = float(loss.detach())  # the Trainer reads it on the host too (logging_nan_inf_filter)
        self.optiplug_step_loss += value
        if not math.isfinite(value):
            self.optiplug_step_loss_finite = False
        return loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "eval_loss" in logs:  # every evaluation also says its perplexity
            from optiplug.app.evaluation import perplexity

            logs = {**logs, "eval_perplexity": perplexity(float(logs["eval_loss"]))}
        return super().log(logs, *args, **kwargs)

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:  # transformers' hook before the step
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self.optiplug_grad_norm = None if norm is None else float(norm)
        return norm


class DivergenceCallback(TrainerCallback):
    """Stop before an optimizer step whose loss or gradient norm is NaN or infinite (raises DivergedError)."""

    def __init__(self, trainer: GuardedTrainer):
        self.trainer = trainer

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self.trainer
        trainer.optiplug_step_loss_finite, trainer.optiplug_step_loss, trainer.optiplug_grad_norm = True, 0.0, None

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self.trainer
        norm = trainer.optiplug_grad_norm
        if norm is None:  # another transformers version, or an engine that does not report it
            model = kwargs.get("model") or trainer.model
            grads = [p.grad for p in model.parameters() if p.grad is not None] if model is not None else []
            finite = all(bool(torch.isfinite(g).all()) for g in grads)
            norm = 0.0 if finite else math.nan
        problems = []
        if not trainer.optiplug_step_loss_finite:
            problems.append(f"the loss is {trainer.optiplug_step_loss}")
        if not math.isfinite(norm):
            problems.append(f"the gradient norm is {norm}")
        if problems:
            step = state.global_step + 1
            checkpoint = last_checkpoint(Path(args.output_dir), before=step)
            raise DivergedError(step, " and ".join(problems), str(checkpoint) if checkpoint else None)


class CheckpointRecordCallback(TrainerCallback):
    """Write the optimizer and scheduler config into every checkpoint (compared when a run resumes from it)."""

    def __init__(self, trainer: OptiTrainer):
        self.trainer = trainer

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir():
            record = {
                "optimizer": self.trainer.optimizer_config.model_dump(mode="json"),
                "scheduler": self.trainer.scheduler_config.model_dump(mode="json"),
            }
            cooldown = getattr(self.trainer, "optiplug_cooldown", None)
            if cooldown is not None:  # a cooldown's checkpoint resumes only as that cooldown
                record["cooldown"] = cooldown.record()
            (checkpoint / CHECKPOINT_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
