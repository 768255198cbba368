"""The divergence guard: :class:`DivergenceCallback` stops a diverging run (imports torch and transformers).

It applies the rules of the run config's ``guard`` section and raises
:class:`~optiplug.app.safety.DivergedError`: a non-finite loss or gradient norm before the optimizer applies it,
gradients exactly 0 for several steps, a loss that stays far above its minimum. This belongs to ``optiplug
train``, not to the mixin: a Python-API user keeps transformers' own behaviour (``logging_nan_inf_filter``) and
may add :class:`DivergenceCallback` to a :class:`~optiplug.app.trainer.GuardedTrainer` of their own (the
callback reads the loss and gradient norm it notes per step).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from optiplug.app.safety import DivergedError, last_checkpoint
from optiplug.app.trainer import GuardedTrainer

__all__ = ["DivergenceCallback"]


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
    from optiplug.unwrap import unwrap_optimizer

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
