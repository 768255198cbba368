"""optiplug-optimi: torch-optimi's StableAdamW (Wortsman et al. 2023) as ``stable_adamw``.

StableAdamW is AdamW with AdaFactor's update clipping per parameter (the update is divided by
``max(1, RMS(g**2 / v))``), optionally with Kahan-compensated updates for bfloat16 and float16
weights. It is transformers' ``TrainingArguments.optim="stable_adamw"``. Importing this module
does not import torch or torch-optimi; the factory does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import optiplug

if TYPE_CHECKING:
    from optiplug_optimi.config import StableAdamWConfig

__all__ = ["StableAdamWConfig", "register_optimizers"]
__version__ = "0.1.0"

CONFIGS = "optiplug_optimi.config"  # imported when a config is first read, not by `optiplug list`
__getattr__ = optiplug.lazy_attributes(__name__, CONFIGS, ["StableAdamWConfig"])


def build(ctx: optiplug.BuildContext, cfg: StableAdamWConfig) -> Any:
    from optimi import StableAdamW

    return StableAdamW(
        ctx.param_groups(cfg.weight_decay),
        lr=cfg.lr,
        betas=cfg.betas,
        weight_decay=cfg.weight_decay,
        eps=cfg.eps,
        decouple_lr=cfg.decouple_lr,
        max_lr=cfg.max_lr,
        kahan_sum=cfg.kahan_sum,
        foreach=cfg.foreach,
        triton=False,  # torch-optimi's Triton kernels need a GPU and a Triton build; foreach or for-loop here
    )


def state_bytes(shapes: Sequence[optiplug.ParamShape], cfg: StableAdamWConfig) -> int:
    """Per parameter: two moments and eps**2 (a scalar) in the weight's dtype, and a Kahan buffer of the weight's
    size for bfloat16/float16 weights unless ``kahan_sum: false``. The step count is one tensor per group."""
    total = 0
    for s in shapes:
        low = s.itemsize < 4
        kahan = 1 if low and cfg.kahan_sum is not False else 0
        total += (2 + kahan) * s.numel * s.itemsize + s.itemsize
    return total


def describe(shapes: Sequence[optiplug.ParamShape], cfg: StableAdamWConfig) -> str:
    kahan = [s for s in shapes if s.itemsize < 4 and cfg.kahan_sum is not False]
    elements = sum(s.numel for s in kahan)
    return f"stable_adamw: Kahan-compensated updates on {len(kahan)} low-precision tensors ({elements / 1e6:.2f}M)"


def transformers_arguments(args: Any, optim_args: Mapping[str, str]) -> dict[str, Any]:
    """transformers' ``optim="stable_adamw"``: the rate, Adam betas and epsilon and weight decay from the arguments,
    and ``optim_args`` keys ``decouple_lr``, ``max_lr``, ``kahan_sum``.

    transformers turns the two booleans into ``bool(text)``, so ``kahan_sum=False`` turns Kahan summation on;
    here ``false`` means false (docs/transformers.md lists the difference)."""
    return optiplug.transformers_fields(args, optim_args, only=("decouple_lr", "max_lr", "kahan_sum"))


def check(ctx: optiplug.BuildContext, cfg: StableAdamWConfig) -> None:
    """Refuse DeepSpeed and FSDP version 1: the update clipping reads each whole weight (its RMS), which their flat
    partitions cut; FSDP2's DTensor shards compute it over the whole weight (tested with 2 processes)."""
    optiplug.check_whole_matrices(ctx, "stable_adamw", "clips each weight's update by an RMS over the whole weight")


@optiplug.hookimpl
def register_optimizers(register: Any) -> None:
    register(
        optiplug.OptimizerEntry(
            config=optiplug.LazyConfig.from_module("stable_adamw", f"{CONFIGS}:StableAdamWConfig"),
            build=build,
            summary="StableAdamW (torch-optimi): AdamW with per-parameter update clipping, Kahan summation",
            requires=("torch-optimi",),
            check=check,
            state_bytes=state_bytes,
            describe=describe,
            aliases=(optiplug.Alias("stable_adamw", transformers=True, arguments=transformers_arguments),),
        )
    )
