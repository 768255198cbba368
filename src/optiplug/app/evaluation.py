"""Evaluation in a run: when it happens, what it logs, what the summary keeps (no torch here).

A run has evaluation data when ``data.eval_path`` or ``data.eval_ratio`` is set (:mod:`optiplug.app.data`
makes the blocks). Then:

* the Trainer evaluates every ``training.eval_steps`` steps (``training.eval_strategy`` defaults to
  ``steps``; ``eval_steps`` to ``logging_steps``, as in transformers), and once more after the last
  step when that step was not evaluated, so the summary always has the loss of the final weights;
* each evaluation logs ``eval_loss`` and ``eval_perplexity`` (``exp(eval_loss)``);
* a ``reduce_lr_on_plateau`` schedule follows ``eval_loss`` (or ``training.metric_for_best_model``).

Without evaluation data, the Trainer arguments that need it are refused before anything is written.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from optiplug.errors import ConfigError

__all__ = ["check_evaluation", "evaluation_defaults", "evaluation_losses", "evaluation_summary", "perplexity"]

# TrainingArguments that need an evaluation set, with the value that asks for none.
_NEEDS_EVALUATION = {"eval_strategy": "no", "load_best_model_at_end": False, "eval_on_start": False}


def evaluation_defaults(has_evaluation: bool) -> dict[str, Any]:
    """``TrainingArguments`` defaults of a run, before its ``training`` section: evaluate at steps when there is data.

    ``prediction_loss_only`` keeps the Trainer from gathering every evaluation batch's logits (a
    run logs the loss only; gathered logits would grow with the evaluation set).
    """
    defaults: dict[str, Any] = {"prediction_loss_only": True}
    if has_evaluation:
        defaults["eval_strategy"] = "steps"
    return defaults


def check_evaluation(training: Mapping[str, Any], has_evaluation: bool) -> None:
    """Refuse Trainer arguments that ask for evaluation in a run without evaluation data.

    Raises:
        ConfigError: ``training.eval_strategy`` (other than ``no``), ``eval_on_start`` or
            ``load_best_model_at_end`` without ``data.eval_path`` or ``data.eval_ratio``.
    """
    if has_evaluation:
        return
    for key, off in _NEEDS_EVALUATION.items():
        value = training.get(key, off)
        if value != off and value not in (None, "no"):
            raise ConfigError(
                f"training.{key}={value!r} needs evaluation data: hold out a share of the corpus with "
                "data.eval_ratio (e.g. 0.05), or give held-out text in data.eval_path"
            )


def perplexity(loss: float) -> float:
    """``exp(loss)``; infinite where it overflows (a loss above ~709)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def evaluation_losses(log_history: Sequence[Mapping[str, Any]]) -> list[tuple[int, float]]:
    """``(step, eval_loss)`` of every evaluation in a Trainer's ``log_history``, in order."""
    return [(int(e["step"]), float(e["eval_loss"])) for e in log_history if "eval_loss" in e and "step" in e]


def evaluation_summary(log_history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The ``summary.json`` keys of a run's evaluations: the last and the best loss, with their steps.

    Empty when nothing was evaluated.
    """
    losses = evaluation_losses(log_history)
    if not losses:
        return {}
    last_step, last = losses[-1]
    best_step, best = min(losses, key=lambda item: (item[1], item[0]))
    return {
        "final_eval_loss": last,
        "final_eval_perplexity": perplexity(last),
        "final_eval_step": last_step,
        "best_eval_loss": best,
        "best_eval_step": best_step,
        "evaluations": len(losses),
    }
