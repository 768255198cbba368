"""torch.optim optimizers: ``adamw`` (the default), adam, sgd, adagrad, rmsprop, radam, nadam, adamax.

Each config's fields are the optimizer's real constructor arguments, and each entry is a row of
``ENTRIES``: the config, torch's class and the fields passed to it (an :class:`optiplug.OptimizerClass`),
and the kernel choice computed from the parameters (adamw, adam). Decay and no-decay parameter groups
follow transformers' rule (no weight decay on biases and norms). Every one of them updates each
parameter from its own gradient and state only, so every entry declares ``per_parameter=True``
(``layerwise: true`` is available).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, model_validator

from optiplug.configs import OptimizerConfig
from optiplug.context import ParamShape
from optiplug.entries import Alias, OptimizerClass, OptimizerEntry
from optiplug.fields import AdamFields, LearningRate
from optiplug.hookspecs import hookimpl
from optiplug.kernel import Kernel, kernel_kwargs
from optiplug.state_sizes import adam_state_bytes, moment_bytes
from optiplug.transformers_args import transformers_fields

DEFAULT = "adamw"
"""What an optimizer section without a name selects."""

_KERNEL_HELP = "Kernel: 'fused' (one kernel), 'foreach' (batched), 'for-loop', or 'auto' (fused where supported)."


class _KernelChoice(OptimizerConfig):
    """A config whose ``kernel`` field picks torch's kernel; a config written up to 0.1 (a YAML file, a
    checkpoint's ``optiplug_config.json``) names that field ``implementation``, read as ``kernel``."""

    @model_validator(mode="before")
    @classmethod
    def _implementation_is_kernel(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "implementation" not in data:
            return data
        data = dict(data)
        old = data.pop("implementation")
        if data.setdefault("kernel", old) != old:
            raise ValueError(
                f"implementation is the old name of kernel: set kernel only (got both, {old!r} and {data['kernel']!r})"
            )
        return data


class AdamWConfig(AdamFields, _KernelChoice):
    """AdamW (decoupled weight decay), torch.optim.AdamW."""

    name: Literal["adamw"] = "adamw"
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (not on biases and norms).")
    amsgrad: bool = False
    kernel: Kernel = Field("auto", description=_KERNEL_HELP)


class AdamConfig(AdamFields, _KernelChoice):
    """Adam (L2 weight decay added to the gradient), torch.optim.Adam."""

    name: Literal["adam"] = "adam"
    amsgrad: bool = False
    kernel: Kernel = Field("auto", description=_KERNEL_HELP)


class SGDConfig(OptimizerConfig):
    """Stochastic gradient descent with optional (Nesterov) momentum, torch.optim.SGD."""

    name: Literal["sgd"] = "sgd"
    lr: LearningRate = 1e-2
    momentum: float = Field(0.9, ge=0, lt=1, description="Momentum factor (0 keeps no optimizer state).")
    dampening: float = Field(0.0, ge=0, le=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0, description="L2 penalty (not on biases and norms).")

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self):
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening 0")
        return self


def sgd_state_bytes(shapes: Sequence[ParamShape], cfg: SGDConfig) -> int:
    return sum(s.numel * s.itemsize for s in shapes) if cfg.momentum > 0 else 0


class AdagradConfig(OptimizerConfig):
    """Adagrad, torch.optim.Adagrad."""

    name: Literal["adagrad"] = "adagrad"
    lr: LearningRate = 1e-2
    lr_decay: float = Field(0.0, ge=0)
    initial_accumulator_value: float = Field(0.0, ge=0)
    eps: float = Field(1e-10, gt=0)
    weight_decay: float = Field(0.0, ge=0)


def one_moment_state_bytes(shapes: Sequence[ParamShape], cfg: OptimizerConfig) -> int:
    return moment_bytes(shapes, 1)


class RMSpropConfig(OptimizerConfig):
    """RMSprop, torch.optim.RMSprop."""

    name: Literal["rmsprop"] = "rmsprop"
    lr: LearningRate = 1e-3
    alpha: float = Field(0.99, gt=0, lt=1, description="Smoothing constant of the squared-gradient average.")
    eps: float = Field(1e-8, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    centered: bool = False
    weight_decay: float = Field(0.0, ge=0)


def rmsprop_state_bytes(shapes: Sequence[ParamShape], cfg: RMSpropConfig) -> int:
    return moment_bytes(shapes, 1 + (cfg.momentum > 0) + cfg.centered)


class RAdamConfig(AdamFields):
    """Rectified Adam, torch.optim.RAdam."""

    name: Literal["radam"] = "radam"
    decoupled_weight_decay: bool = False


class NAdamConfig(AdamFields):
    """Adam with Nesterov momentum, torch.optim.NAdam."""

    name: Literal["nadam"] = "nadam"
    lr: LearningRate = 2e-3
    momentum_decay: float = Field(4e-3, ge=0)
    decoupled_weight_decay: bool = False


def nadam_state_bytes(shapes: Sequence[ParamShape], cfg: NAdamConfig) -> int:
    # exp_avg, exp_avg_sq, plus float32 scalars `step` and `mu_product`
    return moment_bytes(shapes, 2, scalars=2)


class AdamaxConfig(AdamFields):
    """Adamax (Adam with the infinity norm), torch.optim.Adamax."""

    name: Literal["adamax"] = "adamax"
    lr: LearningRate = 2e-3


def _kernel(cfg: AdamWConfig | AdamConfig, groups: list[dict[str, Any]]) -> dict[str, bool]:
    """torch's ``fused``/``foreach`` arguments for ``cfg.kernel`` (``auto``: fused where the parameters allow it)."""
    return kernel_kwargs(cfg.kernel, groups)


def _torch(config: type[OptimizerConfig], cls: str, fields: tuple[str, ...], summary: str, **options: Any):
    """The entry of ``torch.optim.<cls>``: ``cls(groups, lr=cfg.lr, **fields)``. Every one of them updates each
    parameter from its own gradient and state (``per_parameter``)."""
    build = OptimizerClass(f"torch.optim.{cls}", fields, computed=options.pop("computed", None))
    return OptimizerEntry(config=config, build=build, summary=summary, per_parameter=True, **options)


# transformers passes these the learning rate (weight decay through the groups) and optim_args; SGD's momentum is 0.
_HF_LR_AND_DECAY = functools.partial(transformers_fields, take=("learning_rate", "weight_decay"))
_HF_SGD = functools.partial(transformers_fields, take=("learning_rate", "weight_decay"), defaults={"momentum": 0.0})

# The table: each config, its torch.optim class, the fields the constructor takes besides the groups and lr, the
# summary, the state size, and whatever else the entry declares.
ENTRIES = (
    _torch(
        AdamWConfig,
        "AdamW",
        ("betas", "eps", "amsgrad"),
        "AdamW, torch (fused where supported)",
        state_bytes=adam_state_bytes,
        computed=_kernel,
        aliases=(
            Alias("adamw_torch", transformers=True),
            Alias("adamw_torch_fused", {"kernel": "fused"}, transformers=True),
        ),
    ),
    _torch(
        AdamConfig, "Adam", ("betas", "eps", "amsgrad"), "Adam, torch", state_bytes=adam_state_bytes, computed=_kernel
    ),
    _torch(
        SGDConfig,
        "SGD",
        ("momentum", "dampening", "nesterov"),
        "SGD with momentum, torch",
        state_bytes=sgd_state_bytes,
        aliases=(Alias("sgd", transformers=True, arguments=_HF_SGD),),
    ),
    _torch(
        AdagradConfig,
        "Adagrad",
        ("lr_decay", "initial_accumulator_value", "eps"),
        "Adagrad, torch",
        state_bytes=one_moment_state_bytes,
        aliases=(Alias("adagrad", transformers=True, arguments=_HF_LR_AND_DECAY),),
    ),
    _torch(
        RMSpropConfig,
        "RMSprop",
        ("alpha", "eps", "momentum", "centered"),
        "RMSprop, torch",
        state_bytes=rmsprop_state_bytes,
        aliases=(Alias("rmsprop", transformers=True, arguments=_HF_LR_AND_DECAY),),
    ),
    _torch(
        RAdamConfig, "RAdam", ("betas", "eps", "decoupled_weight_decay"), "RAdam, torch", state_bytes=adam_state_bytes
    ),
    _torch(
        NAdamConfig,
        "NAdam",
        ("betas", "eps", "momentum_decay", "decoupled_weight_decay"),
        "NAdam, torch",
        state_bytes=nadam_state_bytes,
    ),
    _torch(AdamaxConfig, "Adamax", ("betas", "eps"), "Adamax, torch", state_bytes=adam_state_bytes),
)


@hookimpl
def register_optimizers(register):
    for entry in ENTRIES:
        register(entry)
