"""optiplug-galore: GaLore (Zhao et al. 2024) low-rank gradient projection optimizers for optiplug.

Registers ``galore_adamw``, ``galore_adafactor`` and ``galore_adamw8bit`` through the ``optiplug``
entry-point group, using only optiplug's public API. Importing this package does not import
torch, galore-torch or bitsandbytes; the factories do.
"""

from __future__ import annotations

import optiplug
from optiplug_galore import entries
from optiplug_galore.config import GaLoreAdafactorConfig, GaLoreAdamW8bitConfig, GaLoreAdamWConfig, GaLoreConfig

__all__ = ["GaLoreAdafactorConfig", "GaLoreAdamW8bitConfig", "GaLoreAdamWConfig", "GaLoreConfig", "register_optimizers"]

__version__ = "0.1.0"


@optiplug.hookimpl
def register_optimizers(register) -> None:
    """Register the three GaLore optimizers."""
    register(
        optiplug.OptimizerEntry(
            config=GaLoreAdamWConfig,
            build=entries.build_adamw,
            summary="GaLore AdamW: low-rank projected gradients (galore-torch)",
            check=entries.check,
            per_parameter=True,
            requires=("galore-torch",),
            state_bytes=entries.adamw_state_bytes,
            describe=entries.describe,
            whole_matrices=True,  # FSDP2: each projection computed once, on one process per matrix
        )
    )
    register(
        optiplug.OptimizerEntry(
            config=GaLoreAdafactorConfig,
            build=entries.build_adafactor,
            summary="GaLore Adafactor: factored second moments of low-rank projected gradients (galore-torch)",
            check=entries.check,
            per_parameter=True,
            requires=("galore-torch",),
            state_bytes=entries.adafactor_state_bytes,
            describe=entries.describe,
        )
    )
    register(
        optiplug.OptimizerEntry(
            config=GaLoreAdamW8bitConfig,
            build=entries.build_adamw8bit,
            summary="GaLore 8-bit AdamW: bitsandbytes' blockwise 8-bit states of low-rank projected gradients",
            check=entries.check_adamw8bit,
            per_parameter=True,
            requires=("galore-torch", "bitsandbytes"),
            state_bytes=entries.adamw8bit_state_bytes,
            describe=entries.describe,
        )
    )
