"""optiplug-adam-mini: Adam-mini (Zhang et al. 2024) as an optiplug optimizer named ``adam_mini``.

Adam-mini keeps Adam's first moment but one second-moment value per block of weights (per attention
head, per row, per norm) instead of one per weight, so its state is about half of AdamW's. Selecting
``optimizer: {name: adam_mini}`` builds adam-mini's ``Adam_mini`` with the hidden size and heads read
from the model's config, its prints sent to a logger, and a check that refuses, before the first
step, the models and launches it cannot train. Importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import optiplug
from optiplug_adam_mini.layout import Layout, block_kind, check_partition, layout_of, second_moments, state_bytes_for

if TYPE_CHECKING:
    from optiplug_adam_mini.config import AdamMiniConfig

__all__ = [
    "AdamMiniConfig",
    "Layout",
    "block_kind",
    "build",
    "check",
    "layout_of",
    "register_optimizers",
    "second_moments",
    "state_bytes_for",
]
__version__ = "0.1.0"

CONFIGS = "optiplug_adam_mini.config"  # imported when a config is first read, not by `optiplug list`
__getattr__ = optiplug.lazy_attributes(__name__, CONFIGS, ["AdamMiniConfig"])


def _sharded_refusal(ctx: optiplug.BuildContext) -> str | None:
    """Why this launch cuts what adam-mini needs whole, or None: one process, DDP, ZeRO-0 and FSDP2 train (FSDP2
    where its row shards hold whole heads: :func:`_heads_cut`)."""
    where = ctx.distributed
    if where == "deepspeed" and (ctx.deepspeed_stage or 0) > 0:
        return (
            f"adam_mini cannot train under DeepSpeed ZeRO stage {ctx.deepspeed_stage}: ZeRO hands the optimizer "
            "flat 1-D partitions of the weights, and adam-mini's per-head and per-row blocks need the weight "
            "matrices (it fails at the first step); set zero_optimization.stage to 0, or train with FSDP2 "
            "(fsdp_config.version: 2), DDP or in one process"
        )
    if where != "fsdp":
        return None
    if optiplug.fsdp_version(ctx) == 1:
        return (
            "adam_mini cannot train under FSDP version 1: it flattens each unit's weights into one 1-D parameter, and "
            "adam-mini's per-head and per-row blocks need the weight matrices; set fsdp_config.version to 2 (row "
            "shards), or train with DDP or in one process"
        )
    return None


def _heads_cut(ctx: optiplug.BuildContext, layout: Layout) -> str | None:
    """FSDP2 cuts each weight into row shards of ``ceil(rows / processes)`` rows: refuse a cut inside a head."""
    for name, param in ctx.named_parameters():
        processes = param.device_mesh.size() if hasattr(param, "device_mesh") else ctx.world_size
        placements = tuple(getattr(param, "placements", ()))
        if placements and any(type(p).__name__ == "Shard" and getattr(p, "dim", 0) != 0 for p in placements):
            return (
                f"adam_mini: {name} is sharded along dimension {placements}, and adam-mini's blocks are rows or "
                "groups of rows: shard along the rows (fully_shard's default Shard(0))"
            )
        if block_kind(name) != "heads" or processes <= 1:
            continue
        rows = int(param.shape[0])
        chunk = -(-rows // processes)
        if chunk % layout.head_dim:
            return (
                f"adam_mini under FSDP with {processes} processes: {name} has {rows // layout.head_dim} heads of "
                f"{layout.head_dim} rows, and FSDP cuts its rows into shards of {chunk}, inside a head, where "
                "adam-mini's one second moment per head would need rows of two processes; train with a number of "
                "processes whose shards hold whole heads (one that divides the number of heads), DDP or one process"
            )
    return None


def check(ctx: optiplug.BuildContext, cfg: AdamMiniConfig) -> None:
    """Refuse, before the first step, what adam-mini cannot train: sharded engines, adapters, models it cannot split."""
    refusal = _sharded_refusal(ctx)
    if refusal is not None:
        raise optiplug.ConfigError(refusal)
    if ctx.uses_adapters:
        raise optiplug.ConfigError(
            "adam_mini trains full weights: LoRA adapter matrices (lora_A, lora_B) are not the attention heads and "
            "rows it partitions (it fails on them at the first step); use full fine-tuning, or adamw or loraplus "
            "for adapters"
        )
    named = ctx.named_parameters()
    if not named:
        raise optiplug.ConfigError(
            "adam_mini: the model has no trainable parameters; unfreeze some or pick another model"
        )
    layout = layout_of(ctx.model)
    check_partition(((name, tuple(param.shape)) for name, param in named), layout)
    cut = _heads_cut(ctx, layout) if ctx.distributed == "fsdp" else None
    if cut is not None:
        raise optiplug.ConfigError(cut)


def build(ctx: optiplug.BuildContext, cfg: AdamMiniConfig) -> Any:
    """adam-mini's ``Adam_mini`` (quiet subclass) over the trainable parameters, laid out from the model's config."""
    from optiplug_adam_mini.optim import AdamMini

    layout = layout_of(ctx.model)
    named = ctx.named_parameters()
    check_partition(((name, tuple(param.shape)) for name, param in named), layout)
    # The core's groups (decay split, the user's optimizer.param_groups), split further into one per parameter.
    groups = ctx.param_groups(cfg.weight_decay)
    options = {
        id(param): {k: v for k, v in group.items() if k != "params"} for group in groups for param in group["params"]
    }
    for name, param in named:
        options[id(param)][optiplug.GROUP_ROLE] = ROLES[block_kind(name)]
    config = getattr(ctx.model, "config", None)
    return AdamMini(
        named,
        layout,
        group_options=options,
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        tied_output=bool(getattr(config, "tie_word_embeddings", False)),
    )


ROLES = {
    "heads": "one second moment per head",
    "rows": "one second moment per row",
    "one": "one second moment per tensor",
    "adam": "adam (one per weight)",
}
"""What adam-mini does with a parameter of each block kind (the role of its group)."""


def describe(shapes: Sequence[optiplug.ParamShape], cfg: AdamMiniConfig) -> str:
    """How adam-mini partitions the parameters: how many get one second moment per head, per row, per tensor."""
    counts = {kind: 0 for kind in ROLES}
    for shape in shapes:
        counts[block_kind(shape.name)] += 1
    return (
        f"adam_mini: one second moment per head of {counts['heads']} query/key weights, per row of "
        f"{counts['rows']} weights, per tensor of {counts['one']} others (norms), per weight of {counts['adam']} "
        "biases"
    )


@optiplug.hookimpl
def register_optimizers(register: Any) -> None:
    register(
        optiplug.OptimizerEntry(
            config=optiplug.LazyConfig.from_module("adam_mini", f"{CONFIGS}:AdamMiniConfig"),
            build=build,
            summary="Adam-mini: one second moment per head/row/norm block (adam-mini), about half AdamW's state",
            check=check,
            requires=("adam-mini",),
            per_parameter=True,  # one group and one state per parameter: layerwise stepping changes nothing
            describe=describe,
        )
    )
