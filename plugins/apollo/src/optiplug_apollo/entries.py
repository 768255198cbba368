"""Factory, check and analytic state size of the APOLLO entries.

torch and apollo-torch are imported inside the functions, never at import time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import optiplug

if TYPE_CHECKING:
    from optiplug_apollo.config import ApolloFields

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
    """The context's parameter groups (``ctx.param_groups``: decay and no-decay, and the user's groups by name)
    split by :func:`optiplug.split_param_groups` (the plain parts, then the APOLLO parts), and every
    parameter's seed in that order.

    APOLLO parts carry ``rank``, ``proj``, ``proj_type``, ``scale_type``, ``update_proj_gap`` and ``scale``.
    """
    targets = set(optiplug.target_parameters(ctx.model, cfg.target_modules))
    name_of = {id(param): name for name, param in ctx.named_parameters()}
    seed_of = transformers_seeds(ctx.model, targets, cfg.seed)
    apollo = {key: getattr(cfg, key) for key in _GROUP_KEYS}
    roles = ("adamw (not a target)", f"apollo rank {cfg.rank} ({cfg.scale_type}-wise)")
    targeted = [param for name, param in ctx.named_parameters() if name in targets]
    groups = optiplug.split_param_groups(ctx.param_groups(cfg.weight_decay), targeted, apollo, roles=roles)
    if cfg.eps_not_targeted is not None:
        for group in groups:
            if "rank" not in group:
                group.setdefault("eps", cfg.eps_not_targeted)
    seeds = [seed_of[name_of[id(p)]] for group in groups for p in group["params"]]
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
    """The setups APOLLO cannot train, each refused with one sentence saying what to do instead.

    FSDP2 trains through the core's sharded matrix step (each weight's projection and scaling computed
    once, by one process per matrix).
    """
    optiplug.check_whole_matrices(
        ctx,
        cfg.name,
        "projects whole weight matrices and scales their rows or columns",
        adapters="trains full weight matrices with low-rank scaling estimates",
    )
    optiplug.target_parameters(ctx.model, cfg.target_modules)


# ---- what the optimizer does, in a line -----------------------------------------------------


def describe(shapes: Sequence[optiplug.ParamShape], cfg: ApolloFields) -> str:
    """``apollo_adamw: 14 matrices (0.43M parameters) scaled channel-wise from a rank-256 random projection ...``."""
    scaled, plain = optiplug.split_shapes(shapes, optiplug.target_shapes(shapes, cfg.target_modules))
    matrices = optiplug.count_shapes(scaled, "matrix", "matrices")
    return (
        f"{cfg.name}: {matrices} scaled {cfg.scale_type}-wise from a rank-{cfg.rank} {cfg.proj} projection "
        f"(new every {cfg.update_proj_gap} steps) · adamw: {optiplug.count_shapes(plain)}"
    )


# ---- analytic state size --------------------------------------------------------------------


def state_bytes(shapes: Sequence[optiplug.ParamShape], cfg: ApolloFields) -> int:
    """Two moments per parameter, low-rank for the targeted weights, which also keep their projection matrix and
    the limiter's last norm (a scalar); all at the weights' dtype. ``step`` and ``seed`` are ints (no tensor)."""
    targets = optiplug.target_shapes(shapes, cfg.target_modules)
    plain = [s for s in shapes if s.name not in targets]
    total = optiplug.moment_bytes(plain, 2, scalars=0)
    for s in shapes:
        if s.name in targets:
            low = math.prod(optiplug.low_rank_shape(s.shape, cfg.rank, cfg.proj_type))
            scalars = 1 if cfg.norm_growth_limiter else 0
            total += (2 * low + optiplug.projector_numel(s.shape, cfg.rank, cfg.proj_type) + scalars) * s.itemsize
    return total
