"""The core's own trainer callbacks."""

from __future__ import annotations

import os
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

__all__ = ["GroupRatesCallback", "SaveProcessorCallback"]


class SaveProcessorCallback(TrainerCallback):
    """Save a processor or tokenizer into every checkpoint and, at the end, into the output directory.

    The Trainer saves its ``processing_class`` itself; this is for a processor it does not know
    about (a multimodal processor next to a tokenizer), as LLaMA-Factory's trainers do.
    """

    def __init__(self, processor: Any):
        self.processor = processor

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            self.processor.save_pretrained(
                os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            )

    def on_train_end(self, args, state, control, **kwargs):
        if args.should_save:
            self.processor.save_pretrained(args.output_dir)


class GroupRatesCallback(TrainerCallback):
    """Record the rate of each ``optimizer.param_groups`` group at every optimizer step.

    The Trainer logs ``learning_rate`` as the rate of the step just taken (read before the
    scheduler moves it); this reads each labelled group's rate at the same moment, so the
    ``lr/<label>`` values of a log record belong to the same step.
    """

    def __init__(self) -> None:
        self.rates: dict[str, float] = {}

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        from optiplug.params import GROUP_KEY
        from optiplug.unwrap import unwrap_optimizer

        rates: dict[str, float] = {}
        for group in getattr(unwrap_optimizer(optimizer), "param_groups", ()) if optimizer is not None else ():
            if GROUP_KEY in group and "lr" in group:
                rates.setdefault(f"lr/{group[GROUP_KEY]}", float(group["lr"]))
        self.rates = rates
