"""optiplug-grokadamw: GrokAdamW (the ``grokadamw`` package) as ``grokadamw``, resumable from a ``weights_only``
checkpoint.

GrokAdamW is AdamW on the gradient plus ``lamb`` times a slow moving average of it (amplifying the
slow-varying part, for grokking), with a first-moment coefficient shrinking with each parameter's
position in its group and a per-parameter gradient clip. It is transformers'
``TrainingArguments.optim="grokadamw"``. Importing this module does not import torch or grokadamw.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import optiplug

if TYPE_CHECKING:
    from optiplug_grokadamw.config import GrokAdamWConfig

__all__ = ["GrokAdamWConfig", "register_optimizers"]
__version__ = "0.1.0"

CONFIGS = "optiplug_grokadamw.config"  # imported when a config is first read, not by `optiplug list`
__getattr__ = optiplug.lazy_attributes(__name__, CONFIGS, ["GrokAdamWConfig"])


def build(ctx: optiplug.BuildContext, cfg: GrokAdamWConfig) -> Any:
    from optiplug_grokadamw.optim import GrokAdamW

    return GrokAdamW(
        ctx.param_groups(cfg.weight_decay),
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        alpha_init=cfg.alpha_init,
        lamb=cfg.lamb,
        gamma=cfg.gamma,
        grokking_signal_decay_rate=cfg.grokking_signal_decay_rate,
        gradient_clipping=cfg.gradient_clipping,
    )


def state_bytes(shapes: Sequence[optiplug.ParamShape], cfg: GrokAdamWConfig) -> int:
    """Three buffers per parameter (both moments and the slow gradient average) in its dtype; the step is an int."""
    return optiplug.moment_bytes(shapes, 3, scalars=0)


def transformers_arguments(args: Any, optim_args: Mapping[str, str]) -> dict[str, Any]:
    """transformers' ``optim="grokadamw"``: the rate and weight decay from the arguments (grokadamw's own betas and
    eps), and ``optim_args`` keys alpha_init, lamb, gamma, grokking_signal_decay_rate, gradient_clipping."""
    return optiplug.transformers_fields(
        args,
        optim_args,
        take=("learning_rate", "weight_decay"),
        only=("alpha_init", "lamb", "gamma", "grokking_signal_decay_rate", "gradient_clipping"),
    )


def check(ctx: optiplug.BuildContext, cfg: GrokAdamWConfig) -> None:
    """Refuse DeepSpeed and FSDP version 1: each weight's gradient clip reads the whole weight, and the momentum
    coefficient follows the weight's position in its group, neither of which a flat partition keeps; FSDP2's DTensor
    shards keep both (tested with 2 processes)."""
    optiplug.check_whole_matrices(
        ctx,
        "grokadamw",
        "clips each weight's gradient by its norm and sets its momentum by its position in the group",
    )


@optiplug.hookimpl
def register_optimizers(register: Any) -> None:
    register(
        optiplug.OptimizerEntry(
            config=optiplug.LazyConfig.from_module("grokadamw", f"{CONFIGS}:GrokAdamWConfig"),
            build=build,
            summary="GrokAdamW (grokadamw): AdamW on the gradient amplified by its slow average",
            requires=("grokadamw",),
            check=check,
            state_bytes=state_bytes,
            aliases=(optiplug.Alias("grokadamw", transformers=True, arguments=transformers_arguments),),
        )
    )
