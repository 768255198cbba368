"""The core's own trainer callbacks."""

from __future__ import annotations

import os
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

__all__ = ["SaveProcessorCallback"]


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
