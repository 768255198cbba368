"""LoRA+ (Hayou et al. 2024) for optiplug: AdamW where the LoRA ``B`` matrices learn ``lr_ratio`` times faster.

The parameter groups follow the LoRA+ reference implementation (also used by peft and
LLaMA-Factory):

* ``lora_B`` matrices and 1-D parameters (biases, trained norms): ``lr * lr_ratio``;
* LoRA embedding factors (``lora_embedding_A``/``lora_embedding_B``): ``embedding_lr``;
* everything else that trains (``lora_A``, fully trained modules): ``lr``;

each split into a decay and a no-decay group (no weight decay on biases and norms). Every
group carries a ``name`` so logs and tests can tell them apart.

Importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import optiplug

if TYPE_CHECKING:
    from optiplug_loraplus.config import LoraPlusConfig

__all__ = ["LoraPlusConfig", "build_loraplus", "check_loraplus", "loraplus_groups", "state_bytes"]

CONFIGS = "optiplug_loraplus.config"  # imported when a config is first read, not by `optiplug list`
__getattr__ = optiplug.lazy_attributes(__name__, CONFIGS, ["LoraPlusConfig"])


def _kind(name: str, ndim: int) -> str:
    if "lora_embedding_" in name:
        return "embedding"
    if "lora_B" in name or ndim == 1:
        return "lora_B"
    return "lora_A"


def loraplus_groups(
    named_parameters: Iterable[tuple[str, Any]],
    decay_names: set[str],
    cfg: LoraPlusConfig,
    base_groups: Sequence[dict[str, Any]],
) -> list[dict[str, Any]]:
    """The LoRA+ parameter groups of the trainable ``named_parameters`` (empty groups dropped).

    Each group has ``name`` (``lora_A``, ``lora_B``, ``embedding``, with ``_no_decay`` for the
    groups without weight decay), ``lr`` and ``weight_decay``. ``base_groups`` are the groups to
    split by kind: ``ctx.param_groups(cfg.weight_decay)``, the decay and no-decay groups with the user's
    ``optimizer.param_groups``. A base group's own ``lr`` is its ``lora_A`` rate.
    """
    named = [(name, param) for name, param in named_parameters if param.requires_grad]
    names = {id(param): name for name, param in named}
    groups: list[dict[str, Any]] = []
    for kind in ("lora_A", "lora_B", "embedding"):
        for base in base_groups:
            params = [p for p in base["params"] if _kind(names[id(p)], p.ndim) == kind]
            if not params:
                continue
            lr = base.get("lr", cfg.lr)
            rate = {"lora_A": lr, "lora_B": lr * cfg.lr_ratio, "embedding": cfg.embedding_lr}[kind]
            name = kind if names[id(params[0])] in decay_names else f"{kind}_no_decay"
            role = _ROLES[kind].format(ratio=cfg.lr_ratio)
            groups.append({**base, "name": name, "params": params, "lr": rate, optiplug.GROUP_ROLE: role})
    return groups


_ROLES = {
    "lora_A": "lora A (lr)",
    "lora_B": "lora B, 1-D (lr x {ratio:g})",
    "embedding": "lora embedding (embedding_lr)",
}


def describe(shapes: Sequence[optiplug.ParamShape], cfg: LoraPlusConfig) -> str:
    """``loraplus: 12 lora_A at lr 0.0002 · 14 lora_B and 1-D at lr x 16 (0.0032) · 0 embedding factors at 1e-06``."""
    counts = {"lora_A": 0, "lora_B": 0, "embedding": 0}
    for shape in shapes:
        counts[_kind(shape.name, len(shape.shape))] += 1
    return (
        f"loraplus: {counts['lora_A']} lora_A at lr {cfg.lr:g} · {counts['lora_B']} lora_B and 1-D at lr x "
        f"{cfg.lr_ratio:g} ({cfg.lr * cfg.lr_ratio:g}) · {counts['embedding']} embedding factors at "
        f"{cfg.embedding_lr:g}"
    )


def check_loraplus(ctx: optiplug.BuildContext, cfg: LoraPlusConfig) -> None:
    """Refuse a model without trainable LoRA B matrices: LoRA+ is only defined for LoRA."""
    if not ctx.uses_adapters:
        raise optiplug.ConfigError(
            "optimizer 'loraplus' trains LoRA adapters, but the model has none: set finetuning.type to 'lora' "
            "(or pass a peft LoRA model), or choose another optimizer"
        )
    if not any("lora_B" in name or "lora_embedding_B" in name for name, _ in ctx.named_parameters()):
        raise optiplug.ConfigError(
            "optimizer 'loraplus' found no trainable LoRA B matrices (lora_B) in the model: it needs a LoRA "
            "adapter, not another peft adapter type"
        )


def build_loraplus(ctx: optiplug.BuildContext, cfg: LoraPlusConfig):
    """torch's AdamW over :func:`loraplus_groups`."""
    import torch

    groups = loraplus_groups(
        ctx.named_parameters(), ctx.decay_parameter_names(), cfg, ctx.param_groups(cfg.weight_decay)
    )
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


state_bytes = optiplug.adam_state_bytes
"""AdamW's two moments and step per trainable parameter."""


@optiplug.hookimpl
def register_optimizers(register):
    register(
        optiplug.OptimizerEntry(
            config=optiplug.LazyConfig.from_module("loraplus", f"{CONFIGS}:LoraPlusConfig"),
            build=build_loraplus,
            summary="LoRA+: AdamW, LoRA B matrices at lr * lr_ratio (needs finetuning.type lora)",
            check=check_loraplus,
            state_bytes=state_bytes,
            describe=describe,
        )
    )
