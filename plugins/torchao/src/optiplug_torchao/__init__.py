"""optiplug-torchao: torchao's AdamW with 8-bit, 4-bit or FP8 moments.

``torchao_adamw8bit`` and ``torchao_adamw4bit`` are transformers' ``adamw_torch_8bit`` and
``adamw_torch_4bit``; ``torchao_adamwfp8`` has no transformers name. Each moment of a parameter
with at least 4096 elements (and a whole number of blocks) is quantized blockwise; smaller ones
stay in the parameter's dtype (torchao's rule). torchao compiles each parameter's update with
``torch.compile`` (on a CPU that needs a C++ compiler; the first step of each shape pays for it).
The state dict holds plain tensors, so the Trainer's ``weights_only`` resume reads it (torchao's
own optimizers cannot be resumed that way). Importing this module does not import torch.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import optiplug

if TYPE_CHECKING:
    from optiplug_torchao.config import (
        LowBitAdamWFields,
        TorchaoAdamW4bitConfig,
        TorchaoAdamW8bitConfig,
        TorchaoAdamWFp8Config,
    )

__all__ = ["TorchaoAdamW4bitConfig", "TorchaoAdamW8bitConfig", "TorchaoAdamWFp8Config", "register_optimizers"]
__version__ = "0.1.0"

CONFIGS = "optiplug_torchao.config"  # imported when a config is first read, not by `optiplug list`
__getattr__ = optiplug.lazy_attributes(
    __name__,
    CONFIGS,
    ["LowBitAdamWFields", "TorchaoAdamW4bitConfig", "TorchaoAdamW8bitConfig", "TorchaoAdamWFp8Config"],
)

MIN_QUANTIZED = 4096
"""torchao quantizes a moment only when the parameter has at least this many elements."""


def build(ctx: optiplug.BuildContext, cfg: LowBitAdamWFields) -> Any:
    from optiplug_torchao.optim import build as build_torchao

    return build_torchao(ctx, cfg)


def check(ctx: optiplug.BuildContext, cfg: LowBitAdamWFields) -> None:
    """Refuse DeepSpeed and FSDP version 1: torchao quantizes each weight's moments in blocks of consecutive
    elements, and keeps weights under 4096 elements unquantized, decided per weight; their flat partitions span
    many weights. FSDP2 is allowed: torchao quantizes each process's shard (DTensor)."""
    optiplug.check_whole_matrices(
        ctx,
        cfg.name,
        f"quantizes each weight's moments in blocks of {cfg.block_size} elements and keeps weights under "
        f"{MIN_QUANTIZED} elements unquantized",
    )


def quantized(shape: optiplug.ParamShape, cfg: LowBitAdamWFields) -> bool:
    """Whether torchao quantizes the moments of ``shape`` (else they are plain tensors of its dtype)."""
    return shape.numel >= MIN_QUANTIZED and shape.numel % cfg.block_size == 0


def moment_bytes(shape: optiplug.ParamShape, cfg: LowBitAdamWFields) -> int:
    """One moment of ``shape``: codes, one float32 scale per block and (8- and 4-bit) the map of its own."""
    from optiplug_torchao.config import TorchaoAdamW4bitConfig, TorchaoAdamW8bitConfig

    n = shape.numel
    if not quantized(shape, cfg):
        return n * shape.itemsize
    scales = n // cfg.block_size * 4
    if isinstance(cfg, TorchaoAdamW8bitConfig):
        return n + scales + 256 * 4
    if isinstance(cfg, TorchaoAdamW4bitConfig):
        return n // 2 + scales + 16 * 4
    return n + scales  # fp8: one byte a value, no map


def state_bytes(shapes: Sequence[optiplug.ParamShape], cfg: LowBitAdamWFields) -> int:
    """Two moments (three with amsgrad) per parameter and its float32 step."""
    moments = 3 if cfg.amsgrad else 2
    return sum(moments * moment_bytes(s, cfg) + optiplug.STEP_BYTES for s in shapes)


def describe(shapes: Sequence[optiplug.ParamShape], cfg: LowBitAdamWFields) -> str:
    plain = [s for s in shapes if not quantized(s, cfg)]
    return (
        f"{len(shapes) - len(plain)} parameters: quantized moments (blocks of {cfg.block_size}); "
        f"{len(plain)} unquantized (fewer than {MIN_QUANTIZED} elements or not a whole number of blocks)"
    )


def _entry(name: str, config: str, summary: str, transformers: str | None = None) -> optiplug.OptimizerEntry:
    # transformers passes the Adam values, block_size 256 (also for 4-bit, whose torchao default is 128) and optim_args
    arguments = functools.partial(optiplug.transformers_fields, defaults={"block_size": 256})
    aliases = (optiplug.Alias(transformers, transformers=True, arguments=arguments),) if transformers else ()
    return optiplug.OptimizerEntry(
        aliases=aliases,
        config=optiplug.LazyConfig.from_module(name, f"{CONFIGS}:{config}"),
        build=build,
        summary=summary,
        requires=("torchao",),
        check=check,
        state_bytes=state_bytes,
        describe=describe,
        per_parameter=True,
    )


@optiplug.hookimpl
def register_optimizers(register: Any) -> None:
    register(
        _entry(
            "torchao_adamw8bit",
            "TorchaoAdamW8bitConfig",
            "AdamW with 8-bit moments, torchao (weights_only resume)",
            "adamw_torch_8bit",
        )
    )
    register(
        _entry(
            "torchao_adamw4bit",
            "TorchaoAdamW4bitConfig",
            "AdamW with 4-bit moments, torchao (weights_only resume)",
            "adamw_torch_4bit",
        )
    )
    register(
        _entry("torchao_adamwfp8", "TorchaoAdamWFp8Config", "AdamW with FP8 moments, torchao (weights_only resume)")
    )
