"""The GaLore optimizer configs (pydantic only: importing this module does not import torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

import optiplug

ALL_LINEAR = "all-linear"

ProjType = Literal["std", "reverse_std", "right", "left", "full"]
Projection = Literal["svd", "randomized"]


class GaLoreConfig(optiplug.OptimizerConfig):
    """Fields shared by every GaLore optimizer: which weights are projected, and how."""

    target_modules: optiplug.TargetModules = Field(
        ALL_LINEAR,
        description="Modules whose 2-D nn.Linear weights are projected: 'all-linear' (every nn.Linear except "
        "the output head), a regex matched against the full module name, or a list (a module is selected "
        "when an item occurs in its name or fully matches it as a regex, as transformers' optim_target_modules).",
    )
    rank: int = Field(
        128,
        gt=0,
        description="Rank of the projection, capped at the smaller side of each matrix "
        "(at the cap it saves no memory).",
    )
    update_proj_gap: int = Field(200, gt=0, description="Recompute each projection every this many optimizer steps.")
    scale: float = Field(0.25, gt=0, description="Factor applied to the update projected back to full rank.")
    proj_type: ProjType = Field(
        "std",
        description="Side projected: 'std' projects the smaller side (right for tall matrices, left for wide), "
        "'reverse_std' the larger, 'right'/'left' always that side, 'full' both.",
    )
    projection: Projection = Field(
        "randomized",
        description="How a projection is recomputed: 'svd' (galore-torch's exact torch.linalg.svd) or "
        "'randomized' (a randomized range finder; falls back to the exact SVD when rank + oversampling "
        "reaches the smaller side of a matrix).",
    )
    oversampling: int = Field(16, ge=0, description="Randomized projection: extra test vectors beyond the rank.")
    power_iterations: int = Field(
        2, ge=0, description="Randomized projection: power iterations (each one QR-orthonormalised)."
    )
    seed: int = Field(0, ge=0, description="Randomized projection: seed of the Gaussian test matrices.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay (not on biases and norms).")


class GaLoreAdamWConfig(GaLoreConfig, optiplug.AdamFields):
    """GaLore with AdamW (galore-torch's GaLoreAdamW math, foreach kernels)."""

    name: Literal["galore_adamw"] = "galore_adamw"
    eps: float = Field(1e-6, gt=0, description="Added to the denominator (galore-torch's default, 1e-6).")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (not on biases and norms).")


class GaLoreAdamW8bitConfig(GaLoreConfig, optiplug.AdamFields):
    """GaLore with bitsandbytes' 8-bit blockwise AdamW on the projected gradients."""

    name: Literal["galore_adamw8bit"] = "galore_adamw8bit"
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (not on biases and norms).")
    min_8bit_size: int = Field(
        4096, ge=1, description="States of tensors with fewer elements stay in float32 (bitsandbytes' rule)."
    )


class GaLoreAdafactorConfig(GaLoreConfig):
    """GaLore with Adafactor (galore-torch's GaLoreAdafactor; external learning rate, no relative step)."""

    name: Literal["galore_adafactor"] = "galore_adafactor"
    lr: optiplug.LearningRate = 1e-3
    beta1: float | None = Field(None, ge=0, lt=1, description="First-moment coefficient; None keeps no first moment.")
    eps: tuple[float, float] = Field(
        (1e-30, 1e-3), description="Regularisation of the squared gradient and of the parameter scale."
    )
    clip_threshold: float = Field(1.0, gt=0, description="Update clipping threshold (root mean square).")
    decay_rate: float = Field(-0.8, lt=0, description="Exponent of the second-moment decay schedule.")
