"""The config class of optiplug_loraplus, imported when a config is first read (not by ``optiplug list``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

import optiplug


class LoraPlusConfig(optiplug.AdamFields):
    """LoRA+: AdamW with a learning rate ``lr_ratio`` times larger for the LoRA B matrices.

    Needs ``finetuning.type: lora``.
    """

    name: Literal["loraplus"] = "loraplus"
    lr: optiplug.LearningRate = Field(
        2e-4, description="Learning rate of the LoRA A matrices (the peak of the schedule)."
    )
    lr_ratio: float = Field(16.0, gt=0, description="Learning rate of the LoRA B matrices divided by lr.")
    embedding_lr: float = Field(1e-6, gt=0, description="Learning rate of LoRA adapters on embedding layers.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (not on biases and norms).")
