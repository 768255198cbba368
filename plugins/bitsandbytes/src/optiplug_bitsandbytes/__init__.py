"""optiplug-bitsandbytes: bitsandbytes' AdamW, Lion, AdEMAMix and RMSprop with 8-bit or 32-bit (paged) state.

One entry per optimizer, with ``bits: 8|32`` and ``paged: true|false`` as fields instead of one
name per combination; transformers' names (``adamw_bnb_8bit``, ``paged_lion_32bit``, ...) are
aliases with those fields preset. With ``bits: 8`` the embeddings keep 32-bit state
(transformers' rule). Importing this module does not import bitsandbytes or torch: on some CPUs
importing bitsandbytes looks a kernel up on the model hub, so it happens inside the factory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import optiplug
from optiplug_bitsandbytes.config import (
    BnbAdamWConfig,
    BnbAdEMAMixConfig,
    BnbFields,
    BnbLionConfig,
    BnbRMSpropConfig,
)

__all__ = ["BnbAdEMAMixConfig", "BnbAdamWConfig", "BnbLionConfig", "BnbRMSpropConfig", "register_optimizers"]
__version__ = "0.1.0"

BLOCK = 256
"""Elements per block of bitsandbytes' blockwise 8-bit state (one float32 maximum per block)."""
QMAP_BYTES = 256 * 4
"""bitsandbytes' 8-bit quantization map: 256 float32 values, one tensor per state shared by all parameters."""
STATES = {"bnb_adamw": 2, "bnb_lion": 1, "bnb_ademamix": 3, "bnb_rmsprop": 1}
"""Full-size states per parameter (AdEMAMix: fast and slow momentum and the second moment)."""


def build(ctx: optiplug.BuildContext, cfg: BnbFields) -> Any:
    from optiplug_bitsandbytes.optim import build as build_bnb

    return build_bnb(ctx, cfg)


def keeps_32bit(shape: optiplug.ParamShape, cfg: BnbFields) -> bool:
    """Whether the parameter ``shape`` gets float32 state under ``cfg``."""
    small = shape.numel < cfg.min_8bit_size
    return cfg.bits == 32 or small or (cfg.embeddings_32bit and shape.module_type == "Embedding")


def state_bytes(shapes: Sequence[optiplug.ParamShape], cfg: BnbFields) -> int:
    """Per parameter: the full-size states in float32, or in uint8 plus one float32 maximum per block of 256;
    one shared 256-value map per 8-bit state. The step count is a Python int (no tensor)."""
    states = STATES[cfg.name]
    total, quantized = 0, False
    for shape in shapes:
        if keeps_32bit(shape, cfg):
            total += states * shape.numel * 4
        else:
            total += states * (shape.numel + math.ceil(shape.numel / BLOCK) * 4)
            quantized = True
    # AdEMAMix's two momenta share one map; AdamW's two moments each have one
    maps = {"bnb_adamw": 2, "bnb_lion": 1, "bnb_ademamix": 2, "bnb_rmsprop": 1}[cfg.name]
    return total + (maps * QMAP_BYTES if quantized else 0)


def describe(shapes: Sequence[optiplug.ParamShape], cfg: BnbFields) -> str:
    kept = [s for s in shapes if keeps_32bit(s, cfg)]
    if cfg.bits == 32:
        return "every parameter: 32-bit state"
    return (
        f"{len(shapes) - len(kept)} parameters: 8-bit blockwise state; {len(kept)} in 32 bits "
        f"(embeddings: {cfg.embeddings_32bit}, fewer than {cfg.min_8bit_size} elements)"
    )


def _entry(config: type[BnbFields], summary: str) -> optiplug.OptimizerEntry:
    return optiplug.OptimizerEntry(
        config=config,
        build=build,
        summary=summary,
        requires=("bitsandbytes",),
        state_bytes=state_bytes,
        describe=describe,
        per_parameter=True,
    )


@optiplug.hookimpl
def register_optimizers(register: Any) -> None:
    register(_entry(BnbAdamWConfig, "AdamW, bitsandbytes: 8-bit or 32-bit state, paged"))
    register(_entry(BnbLionConfig, "Lion, bitsandbytes: 8-bit or 32-bit state, paged"))
    register(_entry(BnbAdEMAMixConfig, "AdEMAMix, bitsandbytes: 8-bit or 32-bit state, paged"))
    register(_entry(BnbRMSpropConfig, "RMSprop, bitsandbytes: 8-bit or 32-bit state"))
