"""The app's Trainer, :class:`GuardedTrainer`, and the callbacks that record what a run writes (imports torch
and transformers).

* :class:`GuardedTrainer` is :class:`~optiplug.OptiTrainer` that notes each optimizer step's loss and gradient
  norm for the divergence guard (:class:`~optiplug.app.divergence.DivergenceCallback`), writes every checkpoint
  whole or not at all (:mod:`optiplug.app.checkpoints`) with the optimizer and scheduler config it was trained
  with (:data:`~optiplug.app.safety.CHECKPOINT_RECORD`, which a resume compares), runs a cooldown's schedule,
  and logs each evaluation's perplexity.
* :class:`CheckpointRecordCallback` writes the same record into the checkpoints of a Trainer of your own.
* :class:`OutputDirCallback` and :class:`OutputDirIntent` keep the output directory's marker
  (:class:`~optiplug.app.safety.OutputDir`) up to date.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from optiplug.trainer import OptiTrainer

__all__ = ["CheckpointRecordCallback", "GuardedTrainer", "OutputDirCallback", "OutputDirIntent"]


class GuardedTrainer(OptiTrainer):
    """OptiTrainer that notes, per optimizer step, whether a loss was non-finite and the gradient norm."""

    optiplug_step_loss_finite: bool = True
    optiplug_step_loss: float = 0.0
    optiplug_grad_norm: float | None = None
    optiplug_cooldown: Any = None  # a cooldown's Branch: its schedule replaces the configured one

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None):
        if self.lr_scheduler is None and self.optiplug_cooldown is not None:
            from optiplug.unwrap import unwrap_optimizer

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

    optiplug_partial: Path | None = None  # while a checkpoint is being written: where (optiplug.app.checkpoints)
    optiplug_output: Any = None  # the run's OutputDir (optiplug.app.safety), which records what the run writes

    def _get_output_dir(self, trial: Any) -> str:
        return str(self.optiplug_partial) if self.optiplug_partial is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Write the checkpoint whole or not at all, with its record (optiplug.app.checkpoints)."""
        from optiplug.app.checkpoints import save_whole

        run_dir = super()._get_output_dir(trial)
        save_whole(self, lambda: super(GuardedTrainer, self)._save_checkpoint(model, trial), run_dir)

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:  # transformers' hook before the step
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self.optiplug_grad_norm = None if norm is None else float(norm)
        return norm


class CheckpointRecordCallback(TrainerCallback):
    """Write the optimizer and scheduler config into every checkpoint of a Trainer of your own (compared when a
    run resumes from it); :class:`GuardedTrainer` writes it into the checkpoint before the checkpoint is complete."""

    def __init__(self, trainer: OptiTrainer):
        self.trainer = trainer

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir():
            from optiplug.app.checkpoints import write_record

            write_record(self.trainer, checkpoint)


class OutputDirCallback(TrainerCallback):
    """The output directory changes only when training starts, after the optimizer, the scheduler and a resumed
    state were built (:meth:`~optiplug.app.safety.OutputDir.begin`): a mistake found until then deletes nothing.
    After each checkpoint the marker records the files written so far."""

    def __init__(self, output: Any, stale: list[str]):
        self.output, self.stale = output, stale

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.output.begin(self.stale)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.output.record()


class OutputDirIntent(TrainerCallback):
    """Added last, after the Trainer's flow callback decided: the checkpoint about to be saved is recorded in the
    marker before it is written (:meth:`~optiplug.app.safety.OutputDir.expect`)."""

    def __init__(self, output: Any):
        self.output = output

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if control.should_save:
            self.output.expect([f"checkpoint-{state.global_step}"])
