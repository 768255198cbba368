"""optiplug-apollo: APOLLO and APOLLO-Mini (Zhu et al. 2024) for optiplug.

Registers ``apollo_adamw`` and ``apollo_mini`` (its rank-1, tensor-wise preset) through the
``optiplug`` entry-point group, using only optiplug's public API. Importing this package does not
import torch or apollo-torch; the factory does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import optiplug
from optiplug_apollo import entries

if TYPE_CHECKING:
    from optiplug_apollo.config import ApolloConfig, ApolloFields, ApolloMiniConfig

__all__ = ["ApolloConfig", "ApolloFields", "ApolloMiniConfig", "register_optimizers"]

__version__ = "0.1.0"

CONFIGS = "optiplug_apollo.config"  # imported when a config is first read, not by `optiplug list`
__getattr__ = optiplug.lazy_attributes(__name__, CONFIGS, ["ApolloConfig", "ApolloFields", "ApolloMiniConfig"])

TRANSFORMERS_KEYS = ("rank", "proj", "scale_type", "update_proj_gap", "scale", "proj_type")
"""The ``optim_args`` keys transformers' Trainer reads for ``apollo_adamw`` (it ignores any other)."""


def transformers_arguments(args: Any, optim_args: Mapping[str, str]) -> dict[str, Any]:
    """What transformers' Trainer builds for ``optim="apollo_adamw"``: the learning rate, and the Adam betas and
    epsilon on the targeted weights only (the others keep apollo-torch's betas and eps 1e-6), no weight decay, the
    ``optim_args`` keys it reads and the ``optim_target_modules`` it requires."""
    fields = optiplug.transformers_fields(
        args, optim_args, take=("learning_rate",), only=TRANSFORMERS_KEYS, targets=True
    )
    betas = (args.adam_beta1, args.adam_beta2)
    if betas != (0.9, 0.999):
        raise optiplug.ConfigError(
            f"transformers' Trainer gives adam_beta1/adam_beta2 {betas} to the targeted weights only and "
            "apollo-torch's (0.9, 0.999) to the others, which one optiplug config cannot say: select apollo_adamw "
            "in an optimizer section with the betas you want for all"
        )
    return {**fields, "eps": args.adam_epsilon, "eps_not_targeted": 1e-6, "weight_decay": 0.0}


@optiplug.hookimpl
def register_optimizers(register) -> None:
    """Register ``apollo_adamw`` and ``apollo_mini``."""
    transformers = (
        optiplug.Alias("apollo_adamw", transformers=True, arguments=transformers_arguments),
        optiplug.Alias(
            "apollo_adamw_layerwise", {"layerwise": True}, transformers=True, arguments=transformers_arguments
        ),
    )
    for name, config, summary, aliases in (
        (
            "apollo_adamw",
            "ApolloConfig",
            "APOLLO AdamW: channel-wise update scaling from a random low-rank space (apollo-torch)",
            transformers,
        ),
        (
            "apollo_mini",
            "ApolloMiniConfig",
            "APOLLO-Mini: rank-1, tensor-wise APOLLO scaling; SGD-level optimizer state",
            (),
        ),
    ):
        register(
            optiplug.OptimizerEntry(
                config=optiplug.LazyConfig.from_module(name, f"{CONFIGS}:{config}"),
                build=entries.build,
                summary=summary,
                check=entries.check,
                requires=("apollo-torch",),
                state_bytes=entries.state_bytes,
                describe=entries.describe,
                per_parameter=True,  # each update reads only its own parameter: optimizer.layerwise: true works
                whole_matrices=True,  # FSDP2: each projection and scaling computed once, on one process per matrix
                aliases=aliases,
            )
        )
