"""torch.optim optimizers: ``adamw`` (the default), adam, sgd, adagrad, rmsprop, radam, nadam, adamax.

Each config's fields are the optimizer's real constructor arguments, and each entry is a row of
``ENTRIES``: the config, torch's class and the fields passed to it (an :class:`optiplug.OptimizerClass`),
and the kernel choice computed from the parameters (adamw, adam). Decay and no-decay parameter groups
follow transformers' rule (no weight decay on biases and norms). Every one of them updates each
parameter from its own gradient and state only, so every entry declares ``per_parameter=True``
(``layerwise: true`` is available). The config classes live in ``optiplug.builtin.configs``, imported when a config
is first read (not by ``optiplug list``), and are still importable from here.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from optiplug.builtin import CONFIGS, lazy_config
from optiplug.configs import OptimizerConfig
from optiplug.context import ParamShape
from optiplug.entries import Alias, LazyConfig, OptimizerClass, OptimizerEntry, lazy_attributes
from optiplug.hookspecs import hookimpl
from optiplug.kernel import kernel_kwargs
from optiplug.state_sizes import adam_state_bytes, moment_bytes
from optiplug.transformers_args import transformers_fields

if TYPE_CHECKING:
    from optiplug.builtin.configs import AdamConfig, AdamWConfig, NAdamConfig, RMSpropConfig, SGDConfig

__getattr__ = lazy_attributes(
    __name__,
    CONFIGS,
    [
        "AdamWConfig",
        "AdamConfig",
        "SGDConfig",
        "AdagradConfig",
        "RMSpropConfig",
        "RAdamConfig",
        "NAdamConfig",
        "AdamaxConfig",
    ],
)

DEFAULT = "adamw"
"""What an optimizer section without a name selects."""


def sgd_state_bytes(shapes: Sequence[ParamShape], cfg: SGDConfig) -> int:
    return sum(s.numel * s.itemsize for s in shapes) if cfg.momentum > 0 else 0


def one_moment_state_bytes(shapes: Sequence[ParamShape], cfg: OptimizerConfig) -> int:
    return moment_bytes(shapes, 1)


def rmsprop_state_bytes(shapes: Sequence[ParamShape], cfg: RMSpropConfig) -> int:
    return moment_bytes(shapes, 1 + (cfg.momentum > 0) + cfg.centered)


def nadam_state_bytes(shapes: Sequence[ParamShape], cfg: NAdamConfig) -> int:
    # exp_avg, exp_avg_sq, plus float32 scalars `step` and `mu_product`
    return moment_bytes(shapes, 2, scalars=2)


def _kernel(cfg: AdamWConfig | AdamConfig, groups: list[dict[str, Any]]) -> dict[str, bool]:
    """torch's ``fused``/``foreach`` arguments for ``cfg.kernel`` (``auto``: fused where the parameters allow it)."""
    return kernel_kwargs(cfg.kernel, groups)


def _torch(config: LazyConfig, cls: str, fields: tuple[str, ...], summary: str, **options: Any):
    """The entry of ``torch.optim.<cls>``: ``cls(groups, lr=cfg.lr, **fields)``. Every one of them updates each
    parameter from its own gradient and state (``per_parameter``)."""
    build = OptimizerClass(f"torch.optim.{cls}", fields, computed=options.pop("computed", None))
    return OptimizerEntry(config=config, build=build, summary=summary, per_parameter=True, **options)


# transformers passes these the learning rate (weight decay through the groups) and optim_args; SGD's momentum is 0.
_HF_LR_AND_DECAY = functools.partial(transformers_fields, take=("learning_rate", "weight_decay"))
_HF_SGD = functools.partial(transformers_fields, take=("learning_rate", "weight_decay"), defaults={"momentum": 0.0})

# The table: each config (its class in optiplug.builtin.configs, built on first read), its torch.optim class, the
# fields the constructor takes besides the groups and lr, the summary, the state size, and whatever else the entry
# declares.
ENTRIES = (
    _torch(
        lazy_config("adamw", "AdamWConfig"),
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
        lazy_config("adam", "AdamConfig"),
        "Adam",
        ("betas", "eps", "amsgrad"),
        "Adam, torch",
        state_bytes=adam_state_bytes,
        computed=_kernel,
    ),
    _torch(
        lazy_config("sgd", "SGDConfig"),
        "SGD",
        ("momentum", "dampening", "nesterov"),
        "SGD with momentum, torch",
        state_bytes=sgd_state_bytes,
        aliases=(Alias("sgd", transformers=True, arguments=_HF_SGD),),
    ),
    _torch(
        lazy_config("adagrad", "AdagradConfig"),
        "Adagrad",
        ("lr_decay", "initial_accumulator_value", "eps"),
        "Adagrad, torch",
        state_bytes=one_moment_state_bytes,
        aliases=(Alias("adagrad", transformers=True, arguments=_HF_LR_AND_DECAY),),
    ),
    _torch(
        lazy_config("rmsprop", "RMSpropConfig"),
        "RMSprop",
        ("alpha", "eps", "momentum", "centered"),
        "RMSprop, torch",
        state_bytes=rmsprop_state_bytes,
        aliases=(Alias("rmsprop", transformers=True, arguments=_HF_LR_AND_DECAY),),
    ),
    _torch(
        lazy_config("radam", "RAdamConfig"),
        "RAdam",
        ("betas", "eps", "decoupled_weight_decay"),
        "RAdam, torch",
        state_bytes=adam_state_bytes,
    ),
    _torch(
        lazy_config("nadam", "NAdamConfig"),
        "NAdam",
        ("betas", "eps", "momentum_decay", "decoupled_weight_decay"),
        "NAdam, torch",
        state_bytes=nadam_state_bytes,
    ),
    _torch(
        lazy_config("adamax", "AdamaxConfig"), "Adamax", ("betas", "eps"), "Adamax, torch", state_bytes=adam_state_bytes
    ),
)


@hookimpl
def register_optimizers(register):
    for entry in ENTRIES:
        register(entry)
