"""One-sided Shampoo: a whole-matrix optimizer as a third-party optiplug plugin, trained under FSDP2 as well."""

from typing import Literal

from pydantic import Field

import optiplug


class OneSidedShampooConfig(optiplug.OptimizerConfig):
    """Momentum preconditioned on the left by (EMA of G G^T)^(-1/4), per weight matrix."""

    name: Literal["one_sided_shampoo"] = "one_sided_shampoo"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    beta: float = Field(0.95, ge=0, lt=1, description="Decay of the left statistic G G^T.")
    eps: float = Field(1e-6, gt=0, description="Added to its eigenvalues before the -1/4 power.")
    weight_decay: float = Field(0.0, ge=0)
    target_modules: optiplug.TargetModules = "all-linear"


def build(ctx: optiplug.BuildContext, cfg: OneSidedShampooConfig):
    from optiplug_testshampoo.optim import OneSidedShampoo  # heavy imports inside the factory

    names = set(optiplug.target_parameters(ctx.model, cfg.target_modules))
    matrices = [param for name, param in ctx.named_parameters() if name in names]
    groups = optiplug.split_param_groups(ctx.param_groups(cfg.weight_decay), matrices, {"precondition": True})
    return OneSidedShampoo(groups, lr=cfg.lr, momentum=cfg.momentum, beta=cfg.beta, eps=cfg.eps)


def check(ctx: optiplug.BuildContext, cfg: OneSidedShampooConfig) -> None:
    optiplug.check_whole_matrices(ctx, cfg.name, "preconditions whole weight matrices")
    optiplug.target_parameters(ctx.model, cfg.target_modules)  # refuses a selection of no trainable matrix


def state_bytes(shapes, cfg: OneSidedShampooConfig) -> int:
    matrices = optiplug.target_shapes(shapes, cfg.target_modules)
    left = sum(s.shape[0] ** 2 * s.itemsize for s in shapes if s.name in matrices)  # one m x m statistic each
    return left + sum(s.numel * s.itemsize for s in shapes)  # and a momentum buffer per parameter


@optiplug.hookimpl
def register_optimizers(register):
    register(
        optiplug.OptimizerEntry(
            config=OneSidedShampooConfig,
            build=build,
            check=check,
            summary="one-sided Shampoo (left preconditioner per matrix)",
            state_bytes=state_bytes,
            per_parameter=True,
            whole_matrices=True,
        )
    )
