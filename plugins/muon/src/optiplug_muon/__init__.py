"""optiplug-muon: Muon (torch.optim.Muon) on the hidden weight matrices, AdamW on the rest, as one optimizer.

Registers the optimizer ``muon`` through the ``optiplug`` entry-point group, using only
optiplug's public API. Importing this package does not import torch; the factory does.
"""

from __future__ import annotations

import optiplug
from optiplug_muon import entries
from optiplug_muon.config import MuonConfig
from optiplug_muon.routing import Routing

__all__ = ["MuonConfig", "Routing", "register_optimizers"]

__version__ = "0.1.0"


@optiplug.hookimpl
def register_optimizers(register) -> None:
    """Register ``muon``."""
    register(
        optiplug.OptimizerEntry(
            config=MuonConfig,
            build=entries.build,
            summary="Muon (torch.optim.Muon) on 2-D hidden matrices + fused AdamW on embeddings, head, norms, biases",
            check=entries.check,
            state_bytes=entries.state_bytes,
            describe=entries.describe,
            whole_matrices=True,
        )
    )
