"""The configs of optiplug-bitsandbytes: one per bitsandbytes optimizer, with ``bits`` and ``paged`` as fields."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

import optiplug

Bits = Literal[8, 32]


class BnbFields(optiplug.OptimizerConfig):
    """What every bitsandbytes optimizer here takes besides its own hyperparameters."""

    bits: Bits = Field(8, description="Optimizer-state precision: 8 (blockwise-quantized) or 32 (float32).")
    min_8bit_size: int = Field(
        4096, ge=1, description="Parameters with fewer elements keep 32-bit state (bitsandbytes' rule)."
    )
    embeddings_32bit: bool = Field(
        True,
        description="With bits 8, keep the state of nn.Embedding weights in 32 bits (transformers' rule: "
        "8-bit state of embeddings is unstable).",
    )


class PageableFields(BnbFields):
    """bitsandbytes' optimizers that can page their state (all but RMSprop)."""

    paged: bool = Field(
        False,
        description="Page the state between GPU and CPU memory under memory pressure (CUDA only; on CPU "
        "parameters bitsandbytes keeps the state unpaged, with a warning).",
    )


class BnbAdamWConfig(PageableFields):
    """AdamW of bitsandbytes (decoupled weight decay): 8-bit blockwise or 32-bit state."""

    name: Literal["bnb_adamw"] = "bnb_adamw"
    lr: optiplug.LearningRate = 1e-3
    betas: optiplug.Betas = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (not on biases and norms).")


class BnbLionConfig(PageableFields):
    """Lion of bitsandbytes (sign of an interpolated momentum): 8-bit blockwise or 32-bit state."""

    name: Literal["bnb_lion"] = "bnb_lion"
    lr: optiplug.LearningRate = 1e-4
    betas: optiplug.Betas = (0.9, 0.99)
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (not on biases and norms).")


class BnbAdEMAMixConfig(PageableFields):
    """AdEMAMix of bitsandbytes (Adam with a second, slow momentum mixed in by ``alpha``)."""

    name: Literal["bnb_ademamix"] = "bnb_ademamix"
    lr: optiplug.LearningRate = 1e-3
    betas: tuple[float, float, float] = Field(
        (0.9, 0.999, 0.9999), description="Fast momentum, second moment, slow momentum; each in [0, 1)."
    )
    alpha: float = Field(5.0, ge=0, description="Weight of the slow momentum.")
    t_alpha: int | None = Field(None, ge=1, description="Steps over which alpha warms up (None: no warmup).")
    t_beta3: int | None = Field(None, ge=1, description="Steps over which the slow beta warms up (None: no warmup).")
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (not on biases and norms).")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(0 <= b < 1 for b in betas):
            raise ValueError("each beta must be in [0, 1)")
        return betas


class BnbRMSpropConfig(BnbFields):
    """RMSprop of bitsandbytes: 8-bit blockwise or 32-bit state (``centered`` is not supported upstream)."""

    name: Literal["bnb_rmsprop"] = "bnb_rmsprop"
    lr: optiplug.LearningRate = 1e-2
    alpha: float = Field(0.99, gt=0, lt=1, description="Smoothing constant of the squared-gradient average.")
    eps: float = Field(1e-8, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, description="L2 penalty (not on biases and norms).")
