"""optiplug-muon: Muon (torch.optim.Muon) on the hidden weight matrices, AdamW on the rest, as one optimizer.

Registers the optimizer ``muon`` through the ``optiplug`` entry-point group, using only
optiplug's public API. Importing this package does not import torch; the factory does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import optiplug
from optiplug_muon import entries
from optiplug_muon.routing import Routing

if TYPE_CHECKING:
    from optiplug_muon.config import MuonConfig

__all__ = ["MuonConfig", "Routing", "register_optimizers"]

__version__ = "0.1.0"

CONFIGS = "optiplug_muon.config"  # imported when a config is first read, not by `optiplug list`
__getattr__ = optiplug.lazy_attributes(__name__, CONFIGS, ["MuonConfig"])


@optiplug.hookimpl
def register_optimizers(register) -> None:
    """Register ``muon``."""
    register(
        optiplug.OptimizerEntry(
            config=optiplug.LazyConfig.from_module("muon", f"{CONFIGS}:MuonConfig"),
            build=entries.build,
            summary="Muon (torch.optim.Muon) on 2-D hidden matrices + fused AdamW on embeddings, head, norms, biases",
            check=entries.check,
            state_bytes=entries.state_bytes,
            describe=entries.describe,
            whole_matrices=True,
        )
    )
