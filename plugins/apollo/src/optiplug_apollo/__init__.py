"""optiplug-apollo: APOLLO and APOLLO-Mini (Zhu et al. 2024) for optiplug.

Registers ``apollo_adamw`` and ``apollo_mini`` (its rank-1, tensor-wise preset) through the
``optiplug`` entry-point group, using only optiplug's public API. Importing this package does not
import torch or apollo-torch; the factory does.
"""

from __future__ import annotations

import optiplug
from optiplug_apollo import entries
from optiplug_apollo.config import ApolloConfig, ApolloFields, ApolloMiniConfig

__all__ = ["ApolloConfig", "ApolloFields", "ApolloMiniConfig", "register_optimizers"]

__version__ = "0.1.0"


@optiplug.hookimpl
def register_optimizers(register) -> None:
    """Register ``apollo_adamw`` and ``apollo_mini``."""
    for config, summary in (
        (ApolloConfig, "APOLLO AdamW: channel-wise update scaling from a random low-rank space (apollo-torch)"),
        (ApolloMiniConfig, "APOLLO-Mini: rank-1, tensor-wise APOLLO scaling; SGD-level optimizer state"),
    ):
        register(
            optiplug.OptimizerEntry(
                config=config,
                build=entries.build,
                summary=summary,
                check=entries.check,
                requires=("apollo-torch",),
                state_bytes=entries.state_bytes,
                describe=entries.describe,
                per_parameter=True,  # each update reads only its own parameter: optimizer.layerwise: true works
                whole_matrices=True,  # FSDP2: each projection and scaling computed once, on one process per matrix
            )
        )
