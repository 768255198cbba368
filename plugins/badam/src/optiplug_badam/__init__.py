"""optiplug-badam: BAdam (block-coordinate AdamW) as an optiplug optimizer named ``badam``.

Selecting ``optimizer: {name: badam}`` brings everything BAdam needs with it: the optimizer
(badam's ``BlockOptimizer`` or ``BlockOptimizerRatio``, with exact resume), badam's
``clip_grad_norm_`` replacement on the accelerator, its trainer callback, and checks that
refuse set-ups BAdam cannot train. Importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import MethodType
from typing import TYPE_CHECKING, Any

import optiplug
from optiplug_badam.blocks import plan_blocks, ratio_frozen

if TYPE_CHECKING:
    from optiplug_badam.config import BAdamConfig

__all__ = ["BAdamConfig", "register_optimizers"]
__version__ = "0.1.0"

CONFIGS = "optiplug_badam.config"  # imported when a config is first read, not by `optiplug list`
__getattr__ = optiplug.lazy_attributes(__name__, CONFIGS, ["BAdamConfig"])

FP32_BYTES = 4


def build(ctx: optiplug.BuildContext, cfg: BAdamConfig) -> Any:
    """Build ``badam.BlockOptimizer`` (layer mode) or ``badam.BlockOptimizerRatio`` (ratio mode) subclasses."""
    from optiplug_badam.optim import build_badam

    return build_badam(ctx, cfg)


def _activation_checkpointing_reentrant(args: Any) -> bool:
    enabled = getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", None)
    kwargs = getattr(args, "activation_checkpointing_kwargs", None) or getattr(
        args, "gradient_checkpointing_kwargs", None
    )
    return bool(enabled) and bool((kwargs or {}).get("use_reentrant", False))


def check(ctx: optiplug.BuildContext, cfg: BAdamConfig) -> None:
    """Refuse, before the first step, the set-ups BAdam cannot train (each with what to change)."""
    where = ctx.distributed
    if cfg.mode == "ratio":
        if where != "none" or ctx.world_size > 1:
            raise optiplug.ConfigError(
                f"badam: mode 'ratio' runs in a single process and this run is distributed ({where}, "
                f"{ctx.world_size} processes): train on one device, or use mode 'layer' with DeepSpeed ZeRO-3"
            )
        if ctx.gradient_accumulation_steps > 1:
            raise optiplug.ConfigError(
                f"badam: mode 'ratio' needs gradient_accumulation_steps 1, got {ctx.gradient_accumulation_steps} "
                "(its sparse-gradient hook runs on every micro-batch and moves the update window once per "
                "micro-batch at a switch): set it to 1, or use mode 'layer'"
            )
    elif where in ("ddp", "fsdp"):
        raise optiplug.ConfigError(
            f"badam: mode 'layer' trains distributed only under DeepSpeed ZeRO-3, not {where.upper()}: launch with "
            "a DeepSpeed config whose zero_optimization.stage is 3"
        )
    elif where == "deepspeed" and cfg.param_groups:
        raise optiplug.ConfigError(
            "badam: optimizer.param_groups is not supported under DeepSpeed ZeRO-3 (badam re-partitions its "
            "groups at every switch): remove optimizer.param_groups"
        )
    elif where == "deepspeed" and ctx.deepspeed_stage != 3:
        raise optiplug.ConfigError(
            f"badam: mode 'layer' under DeepSpeed needs ZeRO stage 3, not stage {ctx.deepspeed_stage}: set "
            "zero_optimization.stage to 3 in the DeepSpeed config"
        )
    if _activation_checkpointing_reentrant(ctx.args):
        raise optiplug.ConfigError(
            "badam: activation checkpointing with use_reentrant=True gets no gradient for the active block "
            "(badam's callback stops the embedding output from requiring grad): set "
            "training.activation_checkpointing_kwargs.use_reentrant to false"
        )
    names = [name for name, _ in ctx.named_parameters()]
    if not names:
        raise optiplug.ConfigError("badam: the model has no trainable parameters; unfreeze some or pick another model")
    if cfg.mode == "layer":
        plan_blocks(names, cfg)


def callbacks(cfg: BAdamConfig) -> list[Any]:
    """badam's trainer callback (subclassed to log block switches and undo its changes after training)."""
    from optiplug_badam.callback import BAdamTrainerCallback

    return [BAdamTrainerCallback()]


def _clip_grad_norm(accelerator: Any, original: Any) -> Any:
    from badam import clip_grad_norm_old_version

    return MethodType(clip_grad_norm_old_version, accelerator)


def patches(cfg: BAdamConfig) -> list[optiplug.Patch]:
    """badam's ``clip_grad_norm_`` on the accelerator.

    torch's foreach norm cannot take ratio mode's sparse gradients.
    """
    return [
        optiplug.Patch(
            target="accelerator",
            attribute="clip_grad_norm_",
            make=_clip_grad_norm,
            reason="badam: clip sparse gradients with torch 1.13's clip_grad_norm_ (badam.clip_grad_norm_old_version)",
        )
    ]


def state_bytes(shapes: Sequence[optiplug.ParamShape], cfg: BAdamConfig) -> int:
    """Peak optimizer state: layer mode, float32 AdamW state (and master copy of weights that are not
    float32) of the largest block; ratio mode, Adam state of the updated fraction of each parameter."""
    names = [shape.name for shape in shapes]
    if cfg.mode == "ratio":
        frozen = set(ratio_frozen(names, cfg))
        return sum(2 * int(s.numel * cfg.update_ratio) * s.itemsize for s in shapes if s.name not in frozen)
    plan = plan_blocks(names, cfg)
    by_name = {shape.name: shape for shape in shapes}
    lora = any("lora" in name for name in names)

    def block_bytes(index: int) -> int:
        total = 0
        for name in plan.members(index, names, cfg.active_modules):
            if lora and "lora" not in name:
                continue
            shape = by_name[name]
            master = FP32_BYTES * shape.numel if shape.itemsize != FP32_BYTES else 0
            total += 2 * FP32_BYTES * shape.numel + optiplug.STEP_BYTES + master
        return total

    return max(block_bytes(index) for index in range(len(plan.blocks)))


def grad_bytes(shapes: Sequence[optiplug.ParamShape], cfg: BAdamConfig) -> int:
    """Peak gradient memory: layer mode holds gradients for the largest block only (the others do not
    require grad); ratio mode computes every gradient (its hooks sparsify them afterwards)."""
    if cfg.mode == "ratio":
        return sum(s.numel * s.itemsize for s in shapes)
    names = [shape.name for shape in shapes]
    plan = plan_blocks(names, cfg)
    by_name = {shape.name: shape for shape in shapes}
    lora = any("lora" in name for name in names)

    def block_bytes(index: int) -> int:
        members = plan.members(index, names, cfg.active_modules)
        return sum(by_name[n].numel * by_name[n].itemsize for n in members if not lora or "lora" in n)

    return max(block_bytes(index) for index in range(len(plan.blocks)))


def describe(shapes: Sequence[optiplug.ParamShape], cfg: BAdamConfig) -> str:
    """``badam: 4 blocks, one trained at a time for 50 steps (ascending), 0.10M-0.12M parameters each``."""
    names = [shape.name for shape in shapes]
    if cfg.mode == "ratio":
        frozen = ratio_frozen(names, cfg)
        line = (
            f"badam ratio mode: {cfg.update_ratio:g} of the entries of each of {len(names) - len(frozen)} tensors "
            f"updated at a time ({cfg.mask_mode}), a new window every {cfg.switch_every} steps"
        )
        return line + (f"; frozen: {', '.join(frozen)}" if frozen else "")
    plan = plan_blocks(names, cfg)
    numel = {shape.name: shape.numel for shape in shapes}
    sizes = [sum(numel[name] for name in plan.members(i, names, cfg.active_modules)) for i in range(len(plan.blocks))]
    low, high = f"{min(sizes) / 1e6:.2f}M", f"{max(sizes) / 1e6:.2f}M"
    line = (
        f"badam: {len(plan.blocks)} blocks, one trained at a time for {cfg.switch_every} steps ({cfg.switch_mode} "
        f"order), {low if low == high else f'{low}-{high}'} parameters each"
    )
    return line + (f"; never trained: {len(plan.never_trained)} tensors" if plan.never_trained else "")


@optiplug.hookimpl
def register_optimizers(register: Any) -> None:
    register(
        optiplug.OptimizerEntry(
            config=optiplug.LazyConfig.from_module("badam", f"{CONFIGS}:BAdamConfig"),
            build=build,
            summary="BAdam: AdamW on one block of layers at a time (badam), exact resume",
            callbacks=callbacks,
            patches=patches,
            check=check,
            requires=("badam",),
            state_bytes=state_bytes,
            grad_bytes=grad_bytes,
            describe=describe,
        )
    )
