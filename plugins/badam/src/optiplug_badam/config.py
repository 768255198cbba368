"""The ``badam`` optimizer config. Importing this module does not import torch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

import optiplug

LAYER_ONLY = ("switch_mode", "start_block", "blocks", "active_modules")
RATIO_ONLY = ("update_ratio", "mask_mode")


class BAdamConfig(optiplug.AdamFields):
    """BAdam: AdamW on one block of parameters at a time (Luo et al. 2024), built on the ``badam`` package.

    ``mode: layer`` trains one block (by default one decoder layer) for ``switch_every`` steps
    and holds AdamW state only for that block; ``mode: ratio`` updates a fraction of every
    weight matrix through sparse gradients.
    """

    name: Literal["badam"] = "badam"
    mode: Literal["layer", "ratio"] = Field(
        "layer", description="'layer': one block of layers at a time; 'ratio': a fraction of every matrix at a time."
    )
    weight_decay: float = Field(
        0.0, ge=0, description="Decoupled weight decay of the active block (not on biases and norms); layer mode only."
    )
    switch_every: int = Field(
        50,
        description="Optimizer steps between block switches (ratio mode: between moves of the updated window); "
        "-1 never switches. As in badam, the first block trains switch_every - 1 steps.",
    )
    switch_mode: Literal["ascending", "descending", "random", "fixed"] = Field(
        "ascending",
        description="Order of the blocks: ascending, descending, random (a new permutation each round), "
        "or fixed (always start_block).",
    )
    start_block: int | None = Field(
        None, ge=0, description="Index of the first block; default: the first of switch_mode's order."
    )
    include_embedding: bool = Field(False, description="Train the input embedding (its own block in layer mode).")
    include_lm_head: bool = Field(
        False,
        description="Train the parameters outside the numbered layers and the embedding (output head, final norm); "
        "one block of their own in layer mode.",
    )
    blocks: tuple[tuple[str, ...], ...] | None = Field(
        None,
        description="Explicit blocks, each a list of parameter-name prefixes (a parameter belongs to a block when "
        "one of its strings occurs in its name, as badam matches); overrides the inferred blocks.",
    )
    active_modules: tuple[str, ...] = Field(
        (), description="Parameter-name prefixes trained together with every block."
    )
    update_ratio: float = Field(
        0.1, gt=0, le=1, description="Ratio mode: fraction of each parameter's entries updated at a time."
    )
    mask_mode: Literal["adjacent", "scatter"] = Field(
        "adjacent", description="Ratio mode: update adjacent entries, or entries scattered at random."
    )

    @model_validator(mode="after")
    def _consistent(self) -> BAdamConfig:
        if self.switch_every == 0 or self.switch_every < -1:
            raise ValueError(f"switch_every must be a positive number of steps or -1 (never), got {self.switch_every}")
        wrong_mode = LAYER_ONLY if self.mode == "ratio" else RATIO_ONLY
        given = [field for field in wrong_mode if field in self.model_fields_set]
        if given:
            other = "layer" if self.mode == "ratio" else "ratio"
            verb = "is" if len(given) == 1 else "are"
            raise ValueError(f"{', '.join(given)} {verb} only used with mode '{other}' (mode is '{self.mode}')")
        if self.mode == "ratio" and self.weight_decay > 0:
            raise ValueError(
                "mode 'ratio' applies no weight decay (badam's sparse Adam has none): set weight_decay to 0"
            )
        if self.start_block is not None and self.switch_mode == "random":
            raise ValueError("start_block cannot be combined with switch_mode 'random' (the order is drawn at random)")
        if self.blocks is not None:
            if not self.blocks or not all(self.blocks):
                raise ValueError("blocks must be a non-empty list of non-empty lists of parameter-name prefixes")
            if not all(prefix for block in self.blocks for prefix in block):
                raise ValueError("blocks must not contain empty prefixes (an empty string matches every parameter)")
            for flag in ("include_embedding", "include_lm_head"):
                if flag in self.model_fields_set:
                    raise ValueError(
                        f"{flag} only shapes the inferred blocks; with explicit blocks, list the parameters"
                    )
        if not all(self.active_modules):
            raise ValueError("active_modules must not contain empty prefixes")
        return self
