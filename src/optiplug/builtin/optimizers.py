"""torch.optim optimizers: ``adamw`` (the default), ``adam``, ``sgd``, ``adagrad``, ``rmsprop``, ``radam``, ``nadam``, ``adamax``.

Each config's fields are the optimizer's real constructor arguments. Decay and no-decay
parameter groups follow transformers' rule (no weight decay on biases and norms).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field, model_validator

from optiplug.config import OptimizerConfig
from optiplug.context import BuildContext, ParamShape
from optiplug.hookspecs import hookimpl
from optiplug.registry import OptimizerEntry

Betas = tuple[float, float]
STEP_BYTES = 4  # torch keeps `step` as a float32 scalar tensor per parameter


def _check_betas(betas: Betas) -> Betas:
    if not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must each be in [0, 1), got {betas}")
    return betas


class _AdamFamily(OptimizerConfig):
    lr: float = Field(1e-3, gt=0, description="Learning rate (the peak of the schedule).")
    betas: Betas = Field((0.9, 0.999), description="Coefficients of the running averages of the gradient and its square.")
    eps: float = Field(1e-8, gt=0, description="Term added to the denominator for numerical stability.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay (not applied to biases and norms).")

    @model_validator(mode="after")
    def _betas_in_range(self):
        _check_betas(self.betas)
        return self


Implementation = Literal["auto", "fused", "foreach", "for-loop"]


def _implementation_kwargs(choice: str, params: list) -> dict:
    """torch's ``fused``/``foreach`` flags for ``choice``; ``auto`` picks fused where torch supports it."""
    if choice == "fused":
        return {"fused": True}
    if choice == "foreach":
        return {"foreach": True, "fused": False}
    if choice == "for-loop":
        return {"foreach": False, "fused": False}
    import torch

    fusable = all(
        p.device.type in ("cpu", "cuda", "mps", "xpu") and torch.is_floating_point(p) for p in params
    )
    # Fused is the fastest correct path on CPU and GPU (measured in benchmarks/); transformers defaults to it too.
    return {"fused": True} if fusable and params else {}


def _all_params(groups: list[dict]) -> list:
    return [p for g in groups for p in g["params"]]


class AdamWConfig(_AdamFamily):
    """AdamW (decoupled weight decay), torch.optim.AdamW."""

    name: Literal["adamw"] = "adamw"
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (not on biases and norms).")
    amsgrad: bool = False
    implementation: Implementation = Field(
        "auto", description="Kernel: 'fused' (one kernel), 'foreach' (batched), 'for-loop', or 'auto' (fused where supported)."
    )


def build_adamw(ctx: BuildContext, cfg: AdamWConfig):
    import torch

    groups = ctx.param_groups(cfg.weight_decay)
    kwargs = _implementation_kwargs(cfg.implementation, _all_params(groups))
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, amsgrad=cfg.amsgrad, **kwargs)


def adam_state_bytes(shapes: Sequence[ParamShape], cfg: AdamWConfig) -> int:
    moments = 3 if getattr(cfg, "amsgrad", False) else 2
    return sum(moments * s.numel * s.itemsize + STEP_BYTES for s in shapes)


class AdamConfig(_AdamFamily):
    """Adam (L2 weight decay added to the gradient), torch.optim.Adam."""

    name: Literal["adam"] = "adam"
    amsgrad: bool = False
    implementation: Implementation = "auto"


def build_adam(ctx: BuildContext, cfg: AdamConfig):
    import torch

    groups = ctx.param_groups(cfg.weight_decay)
    kwargs = _implementation_kwargs(cfg.implementation, _all_params(groups))
    return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, amsgrad=cfg.amsgrad, **kwargs)


class SGDConfig(OptimizerConfig):
    """Stochastic gradient descent with optional (Nesterov) momentum, torch.optim.SGD."""

    name: Literal["sgd"] = "sgd"
    lr: float = Field(1e-2, gt=0, description="Learning rate.")
    momentum: float = Field(0.9, ge=0, lt=1, description="Momentum factor (0 keeps no optimizer state).")
    dampening: float = Field(0.0, ge=0, le=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0, description="L2 penalty (not on biases and norms).")

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self):
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening 0")
        return self


def build_sgd(ctx: BuildContext, cfg: SGDConfig):
    import torch

    return torch.optim.SGD(
        ctx.param_groups(cfg.weight_decay),
        lr=cfg.lr,
        momentum=cfg.momentum,
        dampening=cfg.dampening,
        nesterov=cfg.nesterov,
    )


def sgd_state_bytes(shapes: Sequence[ParamShape], cfg: SGDConfig) -> int:
    return sum(s.numel * s.itemsize for s in shapes) if cfg.momentum > 0 else 0


class AdagradConfig(OptimizerConfig):
    """Adagrad, torch.optim.Adagrad."""

    name: Literal["adagrad"] = "adagrad"
    lr: float = Field(1e-2, gt=0)
    lr_decay: float = Field(0.0, ge=0)
    initial_accumulator_value: float = Field(0.0, ge=0)
    eps: float = Field(1e-10, gt=0)
    weight_decay: float = Field(0.0, ge=0)


def build_adagrad(ctx: BuildContext, cfg: AdagradConfig):
    import torch

    return torch.optim.Adagrad(
        ctx.param_groups(cfg.weight_decay),
        lr=cfg.lr,
        lr_decay=cfg.lr_decay,
        initial_accumulator_value=cfg.initial_accumulator_value,
        eps=cfg.eps,
    )


def one_moment_state_bytes(shapes: Sequence[ParamShape], cfg: OptimizerConfig) -> int:
    return sum(s.numel * s.itemsize + STEP_BYTES for s in shapes)


class RMSpropConfig(OptimizerConfig):
    """RMSprop, torch.optim.RMSprop."""

    name: Literal["rmsprop"] = "rmsprop"
    lr: float = Field(1e-3, gt=0)
    alpha: float = Field(0.99, gt=0, lt=1, description="Smoothing constant of the squared-gradient average.")
    eps: float = Field(1e-8, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    centered: bool = False
    weight_decay: float = Field(0.0, ge=0)


def build_rmsprop(ctx: BuildContext, cfg: RMSpropConfig):
    import torch

    return torch.optim.RMSprop(
        ctx.param_groups(cfg.weight_decay),
        lr=cfg.lr,
        alpha=cfg.alpha,
        eps=cfg.eps,
        momentum=cfg.momentum,
        centered=cfg.centered,
    )


def rmsprop_state_bytes(shapes: Sequence[ParamShape], cfg: RMSpropConfig) -> int:
    per_element = 1 + (cfg.momentum > 0) + cfg.centered
    return sum(per_element * s.numel * s.itemsize + STEP_BYTES for s in shapes)


class RAdamConfig(_AdamFamily):
    """Rectified Adam, torch.optim.RAdam."""

    name: Literal["radam"] = "radam"
    decoupled_weight_decay: bool = False


def build_radam(ctx: BuildContext, cfg: RAdamConfig):
    import torch

    return torch.optim.RAdam(
        ctx.param_groups(cfg.weight_decay),
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        decoupled_weight_decay=cfg.decoupled_weight_decay,
    )


class NAdamConfig(_AdamFamily):
    """Adam with Nesterov momentum, torch.optim.NAdam."""

    name: Literal["nadam"] = "nadam"
    lr: float = Field(2e-3, gt=0)
    momentum_decay: float = Field(4e-3, ge=0)
    decoupled_weight_decay: bool = False


def build_nadam(ctx: BuildContext, cfg: NAdamConfig):
    import torch

    return torch.optim.NAdam(
        ctx.param_groups(cfg.weight_decay),
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        momentum_decay=cfg.momentum_decay,
        decoupled_weight_decay=cfg.decoupled_weight_decay,
    )


def nadam_state_bytes(shapes: Sequence[ParamShape], cfg: NAdamConfig) -> int:
    # exp_avg, exp_avg_sq, plus float32 scalars `step` and `mu_product`
    return sum(2 * s.numel * s.itemsize + 2 * STEP_BYTES for s in shapes)


class AdamaxConfig(_AdamFamily):
    """Adamax (Adam with the infinity norm), torch.optim.Adamax."""

    name: Literal["adamax"] = "adamax"
    lr: float = Field(2e-3, gt=0)


def build_adamax(ctx: BuildContext, cfg: AdamaxConfig):
    import torch

    return torch.optim.Adamax(ctx.param_groups(cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


@hookimpl
def register_optimizers(register):
    register(OptimizerEntry(config=AdamWConfig, build=build_adamw, summary="AdamW, torch (fused where supported)", state_bytes=adam_state_bytes))
    register(OptimizerEntry(config=AdamConfig, build=build_adam, summary="Adam, torch", state_bytes=adam_state_bytes))
    register(OptimizerEntry(config=SGDConfig, build=build_sgd, summary="SGD with momentum, torch", state_bytes=sgd_state_bytes))
    register(OptimizerEntry(config=AdagradConfig, build=build_adagrad, summary="Adagrad, torch", state_bytes=one_moment_state_bytes))
    register(OptimizerEntry(config=RMSpropConfig, build=build_rmsprop, summary="RMSprop, torch", state_bytes=rmsprop_state_bytes))
    register(OptimizerEntry(config=RAdamConfig, build=build_radam, summary="RAdam, torch", state_bytes=adam_state_bytes))
    register(OptimizerEntry(config=NAdamConfig, build=build_nadam, summary="NAdam, torch", state_bytes=nadam_state_bytes))
    register(OptimizerEntry(config=AdamaxConfig, build=build_adamax, summary="Adamax, torch", state_bytes=adam_state_bytes))
