"""Factory, check and analytic state size of the APOLLO entries.

torch and apollo-torch are imported inside the functions, never at import time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import optiplug
from optiplug_apollo.config import ApolloFields
from optiplug_apollo.shapes import low_rank_shape, projector_numel

_GROUP_KEYS = ("rank", "proj", "proj_type", "scale_type", "update_proj_gap", "scale")


# ---- building -------------------------------------------------------------------------------


def transformers_seeds(model: Any, targets: set[str], seed: int = 0) -> dict[str, int]:
    """Each parameter's seed as apollo-torch gets it under transformers' ``optim="apollo_adamw"``.

    transformers builds ``[{non-target parameters}, {target parameters}]`` over every parameter
    of the model (frozen ones too) and apollo-torch numbers them from 1 in that order; ``seed``
    is added to each. With the same seeds the random projections are the same matrices.
    """
    names = [name for name, _ in model.named_parameters()]
    order = [n for n in names if n not in targets] + [n for n in names if n in targets]
    return {name: seed + position for position, name in enumerate(order, start=1)}


def param_groups(ctx: optiplug.BuildContext, cfg: ApolloFields) -> tuple[list[dict[str, Any]], list[int]]:
    """The context's parameter groups (``ctx.param_groups``: decay and no-decay, and the user's groups by name),
    each split into its plain and its APOLLO parameters (empty parts dropped), and every parameter's seed.

    APOLLO parts carry ``rank``, ``proj``, ``proj_type``, ``scale_type``, ``update_proj_gap`` and ``scale``.
    """
    targets = set(optiplug.target_parameters(ctx.model, cfg.target_modules))
    name_of = {id(param): name for name, param in ctx.named_parameters()}
    seed_of = transformers_seeds(ctx.model, targets, cfg.seed)
    apollo = {key: getattr(cfg, key) for key in _GROUP_KEYS}
    roles = {True: f"apollo rank {cfg.rank} ({cfg.scale_type}-wise)", False: "adamw (not a target)"}
    groups: list[dict[str, Any]] = []
    seeds: list[int] = []
    for group in ctx.param_groups(cfg.weight_decay):
        for targeted in (False, True):
            params = [p for p in group["params"] if (name_of[id(p)] in targets) == targeted]
            if params:
                extra = apollo if targeted else {}
                groups.append({**group, "params": params, **extra, optiplug.GROUP_ROLE: roles[targeted]})
                seeds.extend(seed_of[name_of[id(p)]] for p in params)
    return groups, seeds


def build(ctx: optiplug.BuildContext, cfg: ApolloFields) -> Any:
    """An :class:`~optiplug_apollo.optimizer.ApolloAdamW` over the model's trainable parameters."""
    from optiplug_apollo.optimizer import ApolloAdamW

    groups, seeds = param_groups(ctx, cfg)
    return ApolloAdamW(
        groups,
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        scale_front=cfg.scale_front,
        norm_growth_limiter=cfg.norm_growth_limiter,
        seeds=seeds,
    )


# ---- checks ---------------------------------------------------------------------------------


def check(ctx: optiplug.BuildContext, cfg: ApolloFields) -> None:
    """The setups APOLLO cannot train, each refused with one sentence saying what to do instead."""
    name = cfg.name
    if ctx.distributed in ("deepspeed", "fsdp"):
        engine = "DeepSpeed" if ctx.distributed == "deepspeed" else "FSDP"
        raise optiplug.ConfigError(
            f"{name} projects whole weight matrices and scales their rows or columns, which {engine} splits into "
            f"shards; train with DDP or a single process"
        )
    if ctx.uses_adapters:
        raise optiplug.ConfigError(
            f"{name} trains full weight matrices with low-rank scaling estimates, and the model is a PEFT adapter "
            f"model whose trainable weights are already low-rank; use adamw for adapters"
        )
    optiplug.target_parameters(ctx.model, cfg.target_modules)


# ---- what the optimizer does, in a line -----------------------------------------------------


def describe(shapes: Sequence[optiplug.ParamShape], cfg: ApolloFields) -> str:
    """``apollo_adamw: 14 matrices (0.43M parameters) scaled channel-wise from a rank-256 random projection ...``."""
    targets = optiplug.target_shapes(shapes, cfg.target_modules)
    scaled = [s for s in shapes if s.name in targets]
    plain = [s for s in shapes if s.name not in targets]
    return (
        f"{cfg.name}: {_count(scaled, 'matrix', 'matrices')} scaled {cfg.scale_type}-wise from a rank-{cfg.rank} "
        f"{cfg.proj} projection (new every {cfg.update_proj_gap} steps) · adamw: {_count(plain)}"
    )


def _count(shapes: Sequence[optiplug.ParamShape], one: str = "tensor", many: str = "tensors") -> str:
    numel = sum(s.numel for s in shapes)
    return f"{len(shapes)} {one if len(shapes) == 1 else many} ({numel / 1e6:.2f}M parameters)"


# ---- analytic state size --------------------------------------------------------------------


def state_bytes(shapes: Sequence[optiplug.ParamShape], cfg: ApolloFields) -> int:
    """Two moments per parameter, low-rank for the targeted weights, which also keep their projection matrix and
    the limiter's last norm (a scalar); all at the weights' dtype. ``step`` and ``seed`` are ints (no tensor)."""
    targets = optiplug.target_shapes(shapes, cfg.target_modules)
    plain = [s for s in shapes if s.name not in targets]
    total = optiplug.moment_bytes(plain, 2, scalars=0)
    for s in shapes:
        if s.name in targets:
            low = math.prod(low_rank_shape(s.shape, cfg.rank, cfg.proj_type))
            scalars = 1 if cfg.norm_growth_limiter else 0
            total += (2 * low + projector_numel(s.shape, cfg.rank, cfg.proj_type) + scalars) * s.itemsize
    return total
