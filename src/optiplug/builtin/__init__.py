"""The default plugin: AdamW, the torch.optim classics and transformers' schedulers.

It is always loaded and registers through the same hooks as any third-party plugin.
"""

from __future__ import annotations

from optiplug.builtin import adapters, optimizers, schedulers

DEFAULT_OPTIMIZER = "adamw"
DEFAULT_SCHEDULER = "cosine"

PLUGINS = (optimizers, schedulers, adapters)
