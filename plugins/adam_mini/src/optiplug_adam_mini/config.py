"""The config class of optiplug_adam_mini, imported when a config is first read (not by ``optiplug list``)."""

from __future__ import annotations

from typing import Literal

import optiplug


class AdamMiniConfig(optiplug.AdamFields):
    """Adam-mini: Adam with one second-moment value per block (head, row, norm) instead of per weight.

    The blocks come from the model: query and key weights get one learning rate per attention head,
    embedding, output head, value, attention-output and MLP weights one per row, norms one per tensor,
    biases plain Adam. The hidden size and head counts are read from the model's config.
    """

    name: Literal["adam_mini"] = "adam_mini"
