"""The bitsandbytes optimizers, built from a config (imports bitsandbytes: import this module inside factories).

Each class is bitsandbytes' own with one change: the parameters kept in 32-bit state (the
embeddings, transformers' rule) are this optimizer's own set. transformers registers them with
bitsandbytes' process-wide ``GlobalOptimManager``, whose overrides are keyed by ``(group index,
parameter index)`` and ``id(parameter)`` and never cleared: they leak into every later
bitsandbytes optimizer of the process (a second model's parameter at the same index, or a new
tensor reusing a freed id, silently gets 32-bit state).
"""

from __future__ import annotations

import warnings
from typing import Any

import bitsandbytes.optim as bnb
import torch

import optiplug
from optiplug_bitsandbytes.config import (
    BnbAdamWConfig,
    BnbAdEMAMixConfig,
    BnbFields,
    BnbLionConfig,
    BnbRMSpropConfig,
)


def _private_manager() -> Any:
    """An empty ``GlobalOptimManager`` of this optimizer's own: nothing registered on the process-wide one applies."""
    manager = bnb.GlobalOptimManager.__new__(bnb.GlobalOptimManager)
    manager.initialize()
    return manager


class _Own32Bit:
    """Mixin: ``get_config`` gives the parameters in ``self.state_32bit`` float32 state, and nothing else does.

    bitsandbytes reads overrides from the process-wide manager at the first step, by ``(group index,
    parameter index)``: an override another optimizer left there (transformers' Trainer registers one
    for every embedding) would give this optimizer's parameter at that index 32-bit state. Each
    optimizer therefore gets an empty manager of its own.
    """

    state_32bit: set[int]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mng = _private_manager()

    def get_config(self, gindex: int, pindex: int, group: dict[str, Any]) -> dict[str, Any]:
        config = super().get_config(gindex, pindex, group)  # type: ignore[misc]
        if id(self.param_groups[gindex]["params"][pindex]) in self.state_32bit:  # type: ignore[attr-defined]
            config["optim_bits"] = 32
        return config


class AdamW(_Own32Bit, bnb.AdamW):
    """bitsandbytes' AdamW with its own 32-bit parameters."""


class Lion(_Own32Bit, bnb.Lion):
    """bitsandbytes' Lion with its own 32-bit parameters."""


class AdEMAMix(_Own32Bit, bnb.AdEMAMix):
    """bitsandbytes' AdEMAMix with its own 32-bit parameters."""


class RMSprop(_Own32Bit, bnb.RMSprop):
    """bitsandbytes' RMSprop with its own 32-bit parameters."""


def embedding_weights(model: torch.nn.Module) -> set[int]:
    """``id`` of every parameter of an ``nn.Embedding`` (what transformers keeps in 32-bit state)."""
    return {id(p) for module in model.modules() if isinstance(module, torch.nn.Embedding) for p in module.parameters()}


def _hyperparameters(cfg: BnbFields) -> dict[str, Any]:
    if isinstance(cfg, BnbAdamWConfig):
        return {"lr": cfg.lr, "betas": cfg.betas, "eps": cfg.eps}
    if isinstance(cfg, BnbLionConfig):
        return {"lr": cfg.lr, "betas": cfg.betas}
    if isinstance(cfg, BnbAdEMAMixConfig):
        return {"lr": cfg.lr, "betas": cfg.betas, "alpha": cfg.alpha, "eps": cfg.eps, **_warmups(cfg)}
    if isinstance(cfg, BnbRMSpropConfig):
        return {"lr": cfg.lr, "alpha": cfg.alpha, "eps": cfg.eps, "momentum": cfg.momentum}
    raise TypeError(f"not a bitsandbytes config: {type(cfg).__name__}")


def _warmups(cfg: BnbAdEMAMixConfig) -> dict[str, int]:
    return {k: v for k, v in (("t_alpha", cfg.t_alpha), ("t_beta3", cfg.t_beta3)) if v is not None}


CLASSES: dict[type[BnbFields], type[Any]] = {
    BnbAdamWConfig: AdamW,
    BnbLionConfig: Lion,
    BnbAdEMAMixConfig: AdEMAMix,
    BnbRMSpropConfig: RMSprop,
}


def build(ctx: optiplug.BuildContext, cfg: BnbFields) -> Any:
    """The bitsandbytes optimizer ``cfg`` names, on ``ctx``'s decay and no-decay groups."""
    groups = ctx.param_groups(getattr(cfg, "weight_decay", 0.0))
    paged = bool(getattr(cfg, "paged", False))
    on_cpu = any(p.device.type == "cpu" for group in groups for p in group["params"])
    if paged and on_cpu:
        warnings.warn(
            f"{cfg.name}: paged: true pages CUDA memory only; the parameters are on the CPU, so bitsandbytes keeps "
            "the optimizer state unpaged (the same steps)",
            UserWarning,
            stacklevel=2,
        )
    extra: dict[str, Any] = {"is_paged": True} if paged else {}
    optimizer = CLASSES[type(cfg)](
        groups, optim_bits=cfg.bits, min_8bit_size=cfg.min_8bit_size, **_hyperparameters(cfg), **extra
    )
    optimizer.state_32bit = embedding_weights(ctx.model) if cfg.bits == 8 and cfg.embeddings_32bit else set()
    return optimizer
