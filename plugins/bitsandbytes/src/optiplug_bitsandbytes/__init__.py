"""optiplug-bitsandbytes: bitsandbytes' AdamW, Lion, AdEMAMix and RMSprop with 8-bit or 32-bit (paged) state.

One entry per optimizer, with ``bits: 8|32`` and ``paged: true|false`` as fields instead of one
name per combination; transformers' names (``adamw_bnb_8bit``, ``paged_lion_32bit``, ...) are
aliases with those fields preset. With ``bits: 8`` the embeddings keep 32-bit state
(transformers' rule). Importing this module does not import bitsandbytes or torch: on some CPUs
importing bitsandbytes looks a kernel up on the model hub, so it happens inside the factory.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import optiplug

if TYPE_CHECKING:
    from optiplug_bitsandbytes.config import (
        BnbAdamWConfig,
        BnbAdEMAMixConfig,
        BnbFields,
        BnbLionConfig,
        BnbRMSpropConfig,
    )

__all__ = ["BnbAdEMAMixConfig", "BnbAdamWConfig", "BnbLionConfig", "BnbRMSpropConfig", "register_optimizers"]
__version__ = "0.1.0"

CONFIGS = "optiplug_bitsandbytes.config"  # imported when a config is first read, not by `optiplug list`
__getattr__ = optiplug.lazy_attributes(
    __name__, CONFIGS, ["BnbAdEMAMixConfig", "BnbAdamWConfig", "BnbFields", "BnbLionConfig", "BnbRMSpropConfig"]
)

BLOCK = 256
"""Elements per block of bitsandbytes' blockwise 8-bit state (one float32 maximum per block)."""
QMAP_BYTES = 256 * 4
"""bitsandbytes' 8-bit quantization map: 256 float32 values, one tensor per state shared by all parameters."""
STATES = {"bnb_adamw": 2, "bnb_lion": 1, "bnb_ademamix": 3, "bnb_rmsprop": 1}
"""Full-size states per parameter (AdEMAMix: fast and slow momentum and the second moment)."""


def build(ctx: optiplug.BuildContext, cfg: BnbFields) -> Any:
    from optiplug_bitsandbytes.optim import build as build_bnb

    return build_bnb(ctx, cfg)


def check(ctx: optiplug.BuildContext, cfg: BnbFields) -> None:
    """Refuse what bitsandbytes cannot train sharded, each with one sentence.

    FSDP2: bitsandbytes' step is a custom operator that DTensor has no sharding rule for (it fails at the first
    step, measured with 2 processes). DeepSpeed and FSDP version 1 with ``bits: 8``: the 8-bit state is quantized
    in blocks of consecutive elements with one scale each, and which weights keep 32-bit state (min_8bit_size,
    embeddings_32bit) is decided per weight; a flat partition spans many weights, so both would silently change.
    32-bit state is elementwise and allowed there.
    """
    engine = ctx.distributed
    if engine == "fsdp" and optiplug.fsdp_version(ctx) == 2:
        raise optiplug.ConfigError(
            f"{cfg.name}: bitsandbytes' optimizer step is a custom operator with no rule for FSDP2's DTensor shards "
            "(it fails at the first step); train with DDP, DeepSpeed (bits: 32) or a single process, or use adamw "
            "or torchao_adamw8bit under FSDP2"
        )
    if engine in ("deepspeed", "fsdp") and cfg.bits == 8:
        where = f"DeepSpeed (ZeRO stage {ctx.deepspeed_stage})" if engine == "deepspeed" else "FSDP version 1"
        raise optiplug.ConfigError(
            f"{cfg.name} with bits: 8 quantizes its state in blocks of consecutive elements and keeps small weights "
            f"and embeddings in 32 bits, decided per weight, and {where} hands the optimizer flat 1-D partitions "
            "that span many weights; set bits: 32, or train with DDP or a single process"
        )


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


_LR_BETAS_DECAY = ("learning_rate", "adam_beta1", "adam_beta2", "weight_decay")
_ARGUMENTS: dict[str, Any] = {
    "bnb_adamw": functools.partial(optiplug.transformers_fields),  # lr, betas, eps, weight decay
    "bnb_lion": functools.partial(optiplug.transformers_fields, take=_LR_BETAS_DECAY),
    "bnb_rmsprop": functools.partial(optiplug.transformers_fields, take=("learning_rate", "weight_decay")),
}


def ademamix_arguments(args: Any, optim_args: Mapping[str, str]) -> dict[str, Any]:
    """transformers' AdEMAMix: betas from optim_args beta1/beta2/beta3 (else the Adam betas and 0.9999)."""
    fields = optiplug.transformers_fields(args, {}, take=("learning_rate", "adam_epsilon", "weight_decay"))
    betas = (optim_args.get("beta1", args.adam_beta1), optim_args.get("beta2", args.adam_beta2))
    fields["betas"] = (*betas, optim_args.get("beta3", 0.9999))
    rest = {k: v for k, v in optim_args.items() if k not in ("beta1", "beta2", "beta3")}
    return {**fields, **rest}


_ARGUMENTS["bnb_ademamix"] = ademamix_arguments
TRANSFORMERS_NAMES = {
    "bnb_adamw": {
        "adamw_bnb_8bit": {"bits": 8},
        "adamw_8bit": {"bits": 8},
        "paged_adamw_32bit": {"bits": 32, "paged": True},
        "paged_adamw_8bit": {"bits": 8, "paged": True},
    },
    "bnb_lion": {
        "lion_32bit": {"bits": 32},
        "lion_8bit": {"bits": 8},
        "paged_lion_32bit": {"bits": 32, "paged": True},
        "paged_lion_8bit": {"bits": 8, "paged": True},
    },
    "bnb_ademamix": {
        "ademamix": {"bits": 32},
        "ademamix_8bit": {"bits": 8},
        "paged_ademamix_32bit": {"bits": 32, "paged": True},
        "paged_ademamix_8bit": {"bits": 8, "paged": True},
    },
    "bnb_rmsprop": {"rmsprop_bnb": {"bits": 32}, "rmsprop_bnb_8bit": {"bits": 8}, "rmsprop_bnb_32bit": {"bits": 32}},
}
"""transformers' names for each entry, with the fields they fix (transformers' rmsprop_bnb is 32-bit)."""


def _entry(name: str, config: str, summary: str) -> optiplug.OptimizerEntry:
    aliases = tuple(
        optiplug.Alias(alias, preset, transformers=True, arguments=_ARGUMENTS[name])
        for alias, preset in TRANSFORMERS_NAMES[name].items()
    )
    return optiplug.OptimizerEntry(
        aliases=aliases,
        config=optiplug.LazyConfig.from_module(name, f"{CONFIGS}:{config}"),
        build=build,
        summary=summary,
        requires=("bitsandbytes",),
        check=check,
        state_bytes=state_bytes,
        describe=describe,
        per_parameter=True,
    )


@optiplug.hookimpl
def register_optimizers(register: Any) -> None:
    register(_entry("bnb_adamw", "BnbAdamWConfig", "AdamW, bitsandbytes: 8-bit or 32-bit state, paged"))
    register(_entry("bnb_lion", "BnbLionConfig", "Lion, bitsandbytes: 8-bit or 32-bit state, paged"))
    register(_entry("bnb_ademamix", "BnbAdEMAMixConfig", "AdEMAMix, bitsandbytes: 8-bit or 32-bit state, paged"))
    register(_entry("bnb_rmsprop", "BnbRMSpropConfig", "RMSprop, bitsandbytes: 8-bit or 32-bit state"))
