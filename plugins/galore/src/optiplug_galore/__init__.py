"""optiplug-galore: GaLore (Zhao et al. 2024) low-rank gradient projection optimizers for optiplug.

Registers ``galore_adamw``, ``galore_adafactor`` and ``galore_adamw8bit`` through the ``optiplug``
entry-point group, using only optiplug's public API. Importing this package does not import
torch, galore-torch or bitsandbytes; the factories do.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import optiplug
from optiplug_galore import entries

if TYPE_CHECKING:
    from optiplug_galore.config import GaLoreAdafactorConfig, GaLoreAdamW8bitConfig, GaLoreAdamWConfig, GaLoreConfig

__all__ = ["GaLoreAdafactorConfig", "GaLoreAdamW8bitConfig", "GaLoreAdamWConfig", "GaLoreConfig", "register_optimizers"]

__version__ = "0.1.0"

CONFIGS = "optiplug_galore.config"  # imported when a config is first read, not by `optiplug list`
__getattr__ = optiplug.lazy_attributes(
    __name__, CONFIGS, ["GaLoreAdafactorConfig", "GaLoreAdamW8bitConfig", "GaLoreAdamWConfig", "GaLoreConfig"]
)

logger = logging.getLogger(__name__)

TRANSFORMERS_KEYS = ("rank", "update_proj_gap", "scale", "proj_type")
"""The ``optim_args`` keys transformers' Trainer reads for its galore_* names (it ignores any other)."""


def transformers_arguments(args: Any, optim_args: Mapping[str, str], *, weight_decay: float) -> dict[str, Any]:
    """What transformers' Trainer builds for ``optim="galore_*"``: galore-torch's class with only the learning rate
    from ``TrainingArguments`` (its own betas and eps, and its own weight decay on every parameter: 0, or 0.01 for
    the 8-bit class), rank 128, update_proj_gap 200, scale 0.25, proj_type std unless ``optim_args`` says
    otherwise, and the ``optim_target_modules`` it requires."""
    if getattr(args, "weight_decay", 0.0):
        logger.warning(
            "TrainingArguments.weight_decay=%r is not used by transformers' Trainer for optim=%r (galore-torch's "
            "default %r applies), nor by optiplug's mapping of it; select the optimizer in an optimizer section "
            "to set weight_decay",
            args.weight_decay,
            str(getattr(args.optim, "value", args.optim)),
            weight_decay,
        )
    return optiplug.transformers_fields(
        args,
        optim_args,
        take=("learning_rate",),
        defaults={"weight_decay": weight_decay},
        only=TRANSFORMERS_KEYS,
        targets=True,
    )


def _transformers_aliases(name: str, weight_decay: float = 0.0) -> tuple[optiplug.Alias, ...]:
    """transformers' ``name`` and ``name_layerwise``: galore-torch's exact SVD projection, and layerwise stepping
    (transformers' own layerwise optimizer never applies its schedule and saves no state: optiplug's does both)."""
    arguments = functools.partial(transformers_arguments, weight_decay=weight_decay)
    return (
        optiplug.Alias(name, {"projection": "svd"}, transformers=True, arguments=arguments),
        optiplug.Alias(
            f"{name}_layerwise", {"projection": "svd", "layerwise": True}, transformers=True, arguments=arguments
        ),
    )


@optiplug.hookimpl
def register_optimizers(register) -> None:
    """Register the three GaLore optimizers."""
    register(
        optiplug.OptimizerEntry(
            config=optiplug.LazyConfig.from_module("galore_adamw", f"{CONFIGS}:GaLoreAdamWConfig"),
            build=entries.build_adamw,
            summary="GaLore AdamW: low-rank projected gradients (galore-torch)",
            check=entries.check,
            per_parameter=True,
            requires=("galore-torch",),
            state_bytes=entries.adamw_state_bytes,
            describe=entries.describe,
            whole_matrices=True,  # FSDP2: each projection computed once, on one process per matrix
            aliases=_transformers_aliases("galore_adamw"),
        )
    )
    register(
        optiplug.OptimizerEntry(
            config=optiplug.LazyConfig.from_module("galore_adafactor", f"{CONFIGS}:GaLoreAdafactorConfig"),
            build=entries.build_adafactor,
            summary="GaLore Adafactor: factored second moments of low-rank projected gradients (galore-torch)",
            check=entries.check,
            per_parameter=True,
            requires=("galore-torch",),
            state_bytes=entries.adafactor_state_bytes,
            describe=entries.describe,
            aliases=_transformers_aliases("galore_adafactor"),
        )
    )
    register(
        optiplug.OptimizerEntry(
            config=optiplug.LazyConfig.from_module("galore_adamw8bit", f"{CONFIGS}:GaLoreAdamW8bitConfig"),
            build=entries.build_adamw8bit,
            summary="GaLore 8-bit AdamW: bitsandbytes' blockwise 8-bit states of low-rank projected gradients",
            check=entries.check_adamw8bit,
            per_parameter=True,
            requires=("galore-torch", "bitsandbytes"),
            state_bytes=entries.adamw8bit_state_bytes,
            describe=entries.describe,
            aliases=_transformers_aliases("galore_adamw_8bit", weight_decay=0.01),  # galore-torch's 8-bit default
        )
    )
