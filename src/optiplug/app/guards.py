"""The app's Trainer: :class:`~optiplug.OptiTrainer` plus the run's guards (imports torch and transformers).

* A diverging run stops (:class:`~optiplug.app.safety.DivergedError`) by the rules of the run config's
  ``guard`` section (:class:`DivergenceCallback`): a non-finite loss or gradient norm before the optimizer
  applies it, gradients exactly 0 for several steps, a loss that stays far above its minimum. This
  belongs to ``optiplug train``, not to the mixin: a Python-API user keeps transformers' own behaviour
  (``logging_nan_inf_filter``) and may add :class:`DivergenceCallback` to a :class:`GuardedTrainer` of their own.
* Every checkpoint is written whole or not at all (:mod:`optiplug.app.checkpoints`) and records the
  optimizer and scheduler config it was trained with (:data:`~optiplug.app.safety.CHECKPOINT_RECORD`),
  which a resume compares.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from optiplug.app.safety import DivergedError, last_checkpoint
from optiplug.trainer import OptiTrainer

__all__ = ["CheckpointRecordCallback", "DivergenceCallback", "GuardedTrainer", "OutputDirCallback", "OutputDirIntent"]


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


class DivergenceCallback(TrainerCallback):
    """Stop a diverging run by the rules of the run config's ``guard`` section (raises :class:`DivergedError`).

    * **non-finite**: before an optimizer step whose loss or gradient norm is NaN or infinite;
    * **zero gradients**: before the ``zero_grad_steps``-th optimizer step in a row, after step 1, whose
      gradients are all exactly 0 (the network is dead: the blow-up stayed finite and nothing can change
      it any more). Only gradients that are present count: an optimizer that steps during backward
      (``layerwise``, LOMO) frees them before this point, BAdam holds them only for its active block, and
      an engine that keeps them itself (DeepSpeed) shows none; a step without any is no evidence;
    * **loss spike**: after the ``patience``-th logged training loss in a row above ``loss_spike_factor``
      times the lowest logged loss before them. The logged loss is the one every process logs (averaged
      over processes), so every process stops at the same step.
    """

    def __init__(self, trainer: GuardedTrainer, guard: Any = None):
        from optiplug.app.config import GuardConfig

        self.trainer, self.guard = trainer, guard if guard is not None else GuardConfig()
        self.zero_since: int | None = None  # the first step of the current run of all-zero gradients
        self.zero_steps = 0
        self.lowest: tuple[float, int] | None = None  # (loss, step): the lowest logged loss so far
        self.high: list[tuple[int, float]] = []  # (step, loss) logged in a row above the factor
        self.last_logged = 0  # the step of the log before the current one
        self.began = 0  # the first step the first high log covers

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self.trainer
        trainer.optiplug_step_loss_finite, trainer.optiplug_step_loss, trainer.optiplug_grad_norm = True, 0.0, None

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer, step = self.trainer, state.global_step + 1
        norm = trainer.optiplug_grad_norm
        if norm is None:  # another transformers version, or an engine that does not report it
            norm = _norm(_gradients(kwargs.get("model") or trainer.model))
        if self.guard.non_finite:
            problems = []
            if not trainer.optiplug_step_loss_finite:
                problems.append(f"the loss is {trainer.optiplug_step_loss}")
            if norm is not None and not math.isfinite(norm):
                problems.append(f"the gradient norm is {norm}")
            if problems:
                self._stop(args, step, " and ".join(problems))
        if self.guard.zero_grad_steps is None:
            return
        if step > 1 and norm == 0.0 and _gradients(_stepped(trainer)):
            self.zero_since = self.zero_since or step
            self.zero_steps += 1
        else:
            self.zero_since, self.zero_steps = None, 0
        if self.zero_since is not None and self.zero_steps >= self.guard.zero_grad_steps:
            self._stop(
                args, self.zero_since,
                f"the gradients have been exactly 0 for {self.zero_steps} steps in a row (steps {self.zero_since} to "
                f"{step}): the weights no longer change, the network is dead",
                "lower optimizer.lr (guard.zero_grad_steps: null turns this rule off)",
            )  # fmt: skip

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        factor = self.guard.loss_spike_factor
        if not logs or "loss" not in logs or factor is None:
            return
        loss, step = float(logs["loss"]), state.global_step
        if self.lowest is None:  # a resumed run: the losses the checkpoint logged count too
            earlier = [(float(e["loss"]), int(e["step"])) for e in state.log_history[:-1] if "loss" in e]
            self.lowest = min(earlier, default=None)
            self.last_logged = earlier[-1][1] if earlier else 0
        began, self.last_logged = self.last_logged + 1, step
        if self.lowest is None or loss <= factor * self.lowest[0] or not math.isfinite(loss):
            self.high.clear()
            if math.isfinite(loss) and (self.lowest is None or loss < self.lowest[0]):
                self.lowest = (loss, step)
            return
        if not self.high:
            self.began = began
        self.high.append((step, loss))
        if len(self.high) >= self.guard.patience:
            lowest, at = self.lowest
            seen = ", ".join(f"{value:.4g} at step {where}" for where, value in self.high)
            self._stop(
                args, self.high[0][0],
                f"the training loss stayed above {factor:g} x its lowest logged value ({lowest:.4g} at step {at}) for "
                f"{len(self.high)} logged steps: {seen}",
                "lower optimizer.lr or clip the gradients harder (training.max_grad_norm); if the rise is expected, "
                "raise guard.loss_spike_factor",
                before=self.began,
            )  # fmt: skip

    def _stop(self, args: Any, step: int, what: str, advice: str = "lower optimizer.lr", before: int | None = None):
        checkpoint = last_checkpoint(Path(args.output_dir), before=step if before is None else before)
        raise DivergedError(step, what, str(checkpoint) if checkpoint else None, advice)


def _stepped(trainer: Any) -> list[Any]:
    """The parameters the optimizer steps (its param_groups), or the model's trainable ones."""
    from optiplug.helpers import unwrap_optimizer

    optimizer = unwrap_optimizer(trainer.optimizer) if trainer.optimizer is not None else None
    groups = getattr(optimizer, "param_groups", None) or []
    params = [p for group in groups for p in group.get("params", ())]
    if params:
        return params
    return [p for p in trainer.model.parameters() if p.requires_grad] if trainer.model is not None else []


def _gradients(params: Any) -> list[Any]:
    if params is None:
        return []
    if hasattr(params, "parameters"):
        params = params.parameters()
    return [p.grad for p in params if isinstance(p, torch.Tensor) and p.grad is not None]


def _norm(grads: list[Any]) -> float | None:
    """The 2-norm of ``grads`` together; None without any (no evidence: not 0)."""
    if not grads:
        return None
    return math.sqrt(sum(float(torch.linalg.vector_norm(g.detach().float())) ** 2 for g in grads))


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
