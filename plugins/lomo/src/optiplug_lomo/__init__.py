"""optiplug-lomo: LOMO and AdaLomo (the ``lomo-optim`` package) as ``lomo`` and ``adalomo``.

LOMO fuses the update into the backward pass: each parameter is updated, and its gradient freed,
as soon as the gradient exists, so no gradient of the whole model is ever held (AdaLomo adds
Adafactor-style factored second moments). The Trainer's ``optimizer.step()`` does nothing; the
backward pass needs the learning rate. transformers' Trainer passes it only when
``TrainingArguments.optim`` is lomo/adalomo; this plugin's patch passes it whichever way the
optimizer was selected (a config, ``optimizer=``, or ``args.optim``). Importing this module does not
import torch or lomo-optim.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import optiplug

if TYPE_CHECKING:
    from optiplug_lomo.config import AdaLomoConfig, LomoConfig

__all__ = ["AdaLomoConfig", "LomoConfig", "register_optimizers"]
__version__ = "0.1.0"

CONFIGS = "optiplug_lomo.config"  # imported when a config is first read, not by `optiplug list`
__getattr__ = optiplug.lazy_attributes(__name__, CONFIGS, ["LomoConfig", "AdaLomoConfig"])


def build(ctx: optiplug.BuildContext, cfg: LomoConfig) -> Any:
    from optiplug_lomo.config import AdaLomoConfig
    from optiplug_lomo.optim import AdaLomo, Lomo

    common: dict[str, Any] = dict(lr=cfg.lr, clip_grad_norm=cfg.clip_grad_norm, clip_grad_value=cfg.clip_grad_value)
    if isinstance(cfg, AdaLomoConfig):
        return AdaLomo(
            ctx.model,
            **common,
            weight_decay=cfg.weight_decay,
            eps=cfg.eps,
            clip_threshold=cfg.clip_threshold,
            decay_rate=cfg.decay_rate,
            loss_scale=cfg.loss_scale,
        )
    return Lomo(ctx.model, **common, weight_decay=cfg.weight_decay)


def check(ctx: optiplug.BuildContext, cfg: LomoConfig) -> None:
    """What the fused update cannot train, each refused with what to do instead."""
    if ctx.gradient_accumulation_steps > 1:
        raise optiplug.ConfigError(
            f"{cfg.name} updates the weights inside every backward pass, so it cannot accumulate gradients "
            f"(gradient_accumulation_steps={ctx.gradient_accumulation_steps}): set it to 1 and raise the batch size"
        )
    if ctx.distributed != "none":
        raise optiplug.ConfigError(
            f"{cfg.name} updates each weight from its local gradient during backward, before the processes average "
            "it: train it in one process"
        )
    if getattr(ctx.args, "fp16", False):
        raise optiplug.ConfigError(
            f"{cfg.name} scales the loss itself and its fp16 loss scaler is not saved in checkpoints: use bf16 or fp32"
        )


def _backward_with_rate(accelerator: Any, original: Any) -> Any:
    from optiplug_lomo.optim import backward_with_rate

    return backward_with_rate(accelerator, original)


def patches(cfg: LomoConfig) -> list[optiplug.Patch]:
    return [
        optiplug.Patch(
            "accelerator",
            "backward",
            _backward_with_rate,
            f"{cfg.name} updates the weights during backward: hand it the scheduled learning rate",
        )
    ]


def state_bytes(shapes: Sequence[optiplug.ParamShape], cfg: LomoConfig) -> int:
    """LOMO keeps nothing; AdaLomo keeps float32 row and column averages of each matrix's squared gradient and a
    full float32 average for vectors."""
    from optiplug_lomo.config import AdaLomoConfig

    if not isinstance(cfg, AdaLomoConfig):
        return 0
    total = 0
    for s in shapes:
        total += 4 * (s.shape[0] + s.shape[1] if len(s.shape) == 2 else s.numel)
    return total


def describe(shapes: Sequence[optiplug.ParamShape], cfg: LomoConfig) -> str:
    tensors = optiplug.count_shapes(shapes)
    return f"{cfg.name}: every trainable tensor ({tensors}) updated during backward, no gradient kept"


def _entry(name: str, config: str, summary: str) -> optiplug.OptimizerEntry:
    arguments = optiplug.transformers_fields
    return optiplug.OptimizerEntry(
        config=optiplug.LazyConfig.from_module(name, f"{CONFIGS}:{config}"),
        build=build,
        summary=summary,
        check=check,
        patches=patches,
        requires=("lomo-optim",),
        state_bytes=state_bytes,
        describe=describe,
        # transformers passes the learning rate only (and LOMO has no other Adam field): no optim_args keys
        aliases=(
            optiplug.Alias(
                name,
                transformers=True,
                arguments=lambda args, optim_args: arguments(args, optim_args, take=("learning_rate",), only=()),
            ),
        ),
    )


@optiplug.hookimpl
def register_optimizers(register: Any) -> None:
    register(_entry("lomo", "LomoConfig", "LOMO (lomo-optim): SGD fused into backward, no gradients or state held"))
    register(_entry("adalomo", "AdaLomoConfig", "AdaLomo (lomo-optim): LOMO with factored second moments"))
