"""The APOLLO optimizer configs (pydantic only: importing this module does not import torch).

Field names and defaults follow transformers' ``optim="apollo_adamw"`` (``optim_args`` keys ``rank``,
``proj``, ``scale_type``, ``update_proj_gap``, ``scale``, ``proj_type``) and LLaMA-Factory's
``apollo_*`` arguments (``apollo_target``, ``apollo_scale_front``, ...).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

import optiplug

Proj = Literal["random", "svd"]
ProjType = Literal["std", "reverse_std", "right", "left"]
ScaleType = Literal["channel", "tensor"]


class ApolloFields(optiplug.AdamFields):
    """Fields shared by ``apollo_adamw`` and ``apollo_mini``: which weights get APOLLO's scaled update, and how."""

    eps: float = Field(1e-6, gt=0, description="Added to the denominator (apollo-torch's default, 1e-6).")
    target_modules: optiplug.TargetModules = Field(
        "all-linear",
        description="Modules whose 2-D nn.Linear weights get APOLLO's update: 'all-linear' (every nn.Linear except "
        "the output head), a regex matched against the full module name, or a list (a module is selected when an "
        "item occurs in its name or fully matches it as a regex, as transformers' optim_target_modules). The other "
        "parameters get plain AdamW.",
    )
    rank: int = Field(
        128,
        gt=0,
        description="Rank of the auxiliary space the scaling factors are estimated in, capped at the smaller side "
        "of each matrix. 1 with scale_type 'tensor' is APOLLO-Mini.",
    )
    scale: float = Field(
        1.0,
        gt=0,
        description="Heuristic factor compensating the low rank: the update is multiplied by sqrt(scale) "
        "(APOLLO's paper: 1 for rank ~ a quarter of the hidden size, 128 for APOLLO-Mini).",
    )
    update_proj_gap: int = Field(200, gt=0, description="Draw (or recompute) each projection every this many steps.")
    proj: Proj = Field(
        "random",
        description="The projection: 'random' (a seeded Gaussian matrix, no SVD: APOLLO's choice) or 'svd' "
        "(the top singular vectors of the gradient).",
    )
    proj_type: ProjType = Field(
        "std",
        description="Side projected: 'std' the smaller side (right for tall and square matrices, left for wide), "
        "'reverse_std' the larger, 'right'/'left' always that side.",
    )
    scale_type: ScaleType = Field(
        "channel",
        description="'channel': one scaling factor per row or column (the side not projected); 'tensor': one per "
        "weight matrix (APOLLO-Mini).",
    )
    scale_front: bool = Field(
        False,
        description="Multiply by sqrt(scale) before the norm-growth limiter instead of after it (APOLLO's advice "
        "for short warmups).",
    )
    norm_growth_limiter: bool = Field(
        True,
        description="Fira's norm-growth limiter: the norm of a weight's scaled gradient may grow at most 1.01x "
        "per step (apollo-torch's default; false is its disable_nl).",
    )
    eps_not_targeted: float | None = Field(
        None,
        gt=0,
        description="eps of the parameters that are not targeted (plain AdamW); null: eps. transformers' "
        "optim='apollo_adamw' gives them apollo-torch's default 1e-6 and the targeted weights adam_epsilon.",
    )
    seed: int = Field(
        0,
        ge=0,
        description="Added to each weight's seed (apollo-torch's: its 1-based position in the model); 0 draws "
        "exactly transformers' random projections.",
    )


class ApolloConfig(ApolloFields):
    """APOLLO AdamW (Zhu et al. 2024): AdamW-like updates from channel-wise scaling factors estimated in a
    random low-rank space, with optimizer state near SGD's."""

    name: Literal["apollo_adamw"] = "apollo_adamw"


class ApolloMiniConfig(ApolloFields):
    """APOLLO-Mini: rank 1, one scaling factor per weight matrix (tensor-wise), scale 128; SGD-level state."""

    name: Literal["apollo_mini"] = "apollo_mini"
    rank: int = Field(1, gt=0, description="Rank of the auxiliary space (APOLLO-Mini: 1).")
    scale: float = Field(128.0, gt=0, description="The update is multiplied by sqrt(scale) (APOLLO-Mini: 128).")
    scale_type: ScaleType = Field("tensor", description="'tensor': one scaling factor per weight matrix (APOLLO-Mini).")
