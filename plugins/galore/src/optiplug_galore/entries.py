"""Factories, checks, patches and analytic state sizes of the GaLore entries.

torch, galore-torch and bitsandbytes are imported inside the functions, never at import time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import optiplug

if TYPE_CHECKING:
    from optiplug_galore.config import GaLoreAdafactorConfig, GaLoreAdamW8bitConfig, GaLoreAdamWConfig, GaLoreConfig

_GALORE_KEYS = (
    "rank",
    "update_proj_gap",
    "scale",
    "proj_type",
    "projection",
    "oversampling",
    "power_iterations",
    "seed",
)


# ---- building -------------------------------------------------------------------------------


def param_groups(ctx: optiplug.BuildContext, cfg: GaLoreConfig) -> list[dict[str, Any]]:
    """``ctx.param_groups`` split by :func:`optiplug.split_param_groups`: the parts that are not projected
    (each group's untargeted parameters), then the projected parts, which carry the GaLore settings
    (``rank``, ``update_proj_gap``, ...). The order is galore-torch's under transformers (and
    checkpoints' optimizer state is keyed by it)."""
    names = set(optiplug.target_parameters(ctx.model, cfg.target_modules))
    targets = [param for name, param in ctx.named_parameters() if name in names]
    galore = {key: getattr(cfg, key) for key in _GALORE_KEYS}
    roles = ("full rank (not a target)", f"galore rank {cfg.rank}")
    return optiplug.split_param_groups(ctx.param_groups(cfg.weight_decay), targets, galore, roles=roles)


def build_adamw(ctx: optiplug.BuildContext, cfg: GaLoreAdamWConfig):
    from optiplug_galore.adamw import GaLoreAdamW

    return GaLoreAdamW(param_groups(ctx, cfg), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def build_adafactor(ctx: optiplug.BuildContext, cfg: GaLoreAdafactorConfig):
    from optiplug_galore.adafactor import GaLoreAdafactor

    return GaLoreAdafactor(
        param_groups(ctx, cfg),
        lr=cfg.lr,
        eps=cfg.eps,
        clip_threshold=cfg.clip_threshold,
        decay_rate=cfg.decay_rate,
        beta1=cfg.beta1,
        weight_decay=cfg.weight_decay,
    )


def build_adamw8bit(ctx: optiplug.BuildContext, cfg: GaLoreAdamW8bitConfig):
    from optiplug_galore.adamw8bit import GaLoreAdamW8bit

    return GaLoreAdamW8bit(
        param_groups(ctx, cfg),
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        min_8bit_size=cfg.min_8bit_size,
    )


# ---- checks ---------------------------------------------------------------------------------


def check(ctx: optiplug.BuildContext, cfg: GaLoreConfig) -> None:
    """The setups GaLore cannot train, each refused with one sentence saying what to do instead.

    FSDP2 trains ``galore_adamw`` through the core's sharded matrix step (each projection computed
    once, on one process per matrix); ``galore_adafactor`` and ``galore_adamw8bit`` run galore-torch's
    and bitsandbytes' step code, which needs the whole matrix in every process, so they are refused.
    ``layerwise: true`` is checked by the core (``optiplug.layerwise.check_layerwise``) after this.
    """
    sharded = cfg.name == "galore_adamw"
    optiplug.check_whole_matrices(
        ctx,
        cfg.name,
        "projects whole weight matrices",
        fsdp2=sharded,
        adapters="trains full weight matrices through low-rank projections",
        instead=None if sharded else "galore_adamw under FSDP2, DDP or a single process",
    )
    optiplug.target_parameters(ctx.model, cfg.target_modules)


def check_adamw8bit(ctx: optiplug.BuildContext, cfg: GaLoreAdamW8bitConfig) -> None:
    check(ctx, cfg)
    device = next((p.device for _, p in ctx.named_parameters()), None)
    if device is None:
        return
    problem = _bnb_8bit_problem(str(device))
    if problem:
        raise optiplug.ConfigError(adamw8bit_refusal(str(device), problem))


def adamw8bit_refusal(device: str, problem: str) -> str:
    """The one sentence ``galore_adamw8bit``'s check says where bitsandbytes cannot run."""
    return (
        f"galore_adamw8bit: bitsandbytes cannot run its 8-bit AdamW on the model's device ({device}) here "
        f"({problem}); use galore_adamw instead"
    )


_BNB_PROBES: dict[str, str | None] = {}


def _bnb_8bit_problem(device: str) -> str | None:
    """Why bitsandbytes' 8-bit AdamW cannot step a tensor on ``device`` (None when it can); probed once per device."""
    if device not in _BNB_PROBES:
        import torch

        try:
            import bitsandbytes as bnb

            param = torch.nn.Parameter(torch.ones(512, device=device))
            param.grad = torch.ones_like(param)
            bnb.optim.AdamW8bit([param], lr=1e-3, min_8bit_size=1).step()
            _BNB_PROBES[device] = None
        except Exception as error:  # any failure means "cannot run here"; the message carries the cause
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            _BNB_PROBES[device] = f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__
    return _BNB_PROBES[device]


# ---- what the optimizer does, in a line -----------------------------------------------------


def describe(shapes: Sequence[optiplug.ParamShape], cfg: GaLoreConfig) -> str:
    """``galore_adamw: 14 matrices (0.43M parameters) projected to rank 8 ... · full rank: 6 tensors (0.26M)``."""
    projected, full = optiplug.split_shapes(shapes, optiplug.target_shapes(shapes, cfg.target_modules))
    matrices = optiplug.count_shapes(projected, "matrix", "matrices")
    return (
        f"{cfg.name}: {matrices} projected to rank {cfg.rank} ({cfg.projection}, new projection every "
        f"{cfg.update_proj_gap} steps) · full rank: {optiplug.count_shapes(full)}"
    )


# ---- analytic state sizes -------------------------------------------------------------------


def _projected(shapes: Sequence[optiplug.ParamShape], cfg: GaLoreConfig):
    targets = optiplug.target_shapes(shapes, cfg.target_modules)
    return [(s, s.name in targets) for s in shapes]


def adamw_state_bytes(shapes: Sequence[optiplug.ParamShape], cfg: GaLoreAdamWConfig) -> int:
    """Two moments (low-rank for projected weights) plus the projection matrices, at the weights' dtype.

    ``step`` is a Python int (no tensor).
    """
    total = 0
    for s, projected in _projected(shapes, cfg):
        if projected:
            low = math.prod(optiplug.low_rank_shape(s.shape, cfg.rank, cfg.proj_type))
            total += (2 * low + optiplug.projector_numel(s.shape, cfg.rank, cfg.proj_type)) * s.itemsize
        else:
            total += 2 * s.numel * s.itemsize
    return total


def adafactor_state_bytes(shapes: Sequence[optiplug.ParamShape], cfg: GaLoreAdafactorConfig) -> int:
    """Factored second moments (row and column) of each matrix, full ones of vectors, the optional first
    moment, a scalar RMS, and the projection matrices; in float32 for half-precision weights."""
    total = 0
    for s, projected in _projected(shapes, cfg):
        size = max(s.itemsize, 4)  # galore-torch's Adafactor works on float32 gradients of half-precision weights
        shape = optiplug.low_rank_shape(s.shape, cfg.rank, cfg.proj_type) if projected else tuple(s.shape)
        numel = math.prod(shape)
        elements = numel if cfg.beta1 is not None else 0
        elements += math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1] if len(shape) >= 2 else numel
        elements += 1  # RMS
        if projected:
            elements += optiplug.projector_numel(s.shape, cfg.rank, cfg.proj_type)
        total += elements * size
    return total


def adamw8bit_state_bytes(shapes: Sequence[optiplug.ParamShape], cfg: GaLoreAdamW8bitConfig) -> int:
    """bitsandbytes' states: two uint8 tensors plus two float32 block maxima per 256 elements, or two float32
    tensors below ``min_8bit_size`` elements; the two shared 256-entry quantisation maps once; projections."""
    total, quantized = 0, False
    for s, projected in _projected(shapes, cfg):
        numel = math.prod(optiplug.low_rank_shape(s.shape, cfg.rank, cfg.proj_type)) if projected else s.numel
        if numel < cfg.min_8bit_size:
            total += 2 * 4 * numel
        else:
            quantized = True
            total += 2 * numel + 2 * 4 * math.ceil(numel / 256)
        if projected:
            total += optiplug.projector_numel(s.shape, cfg.rank, cfg.proj_type) * s.itemsize
    return total + (2 * 256 * 4 if quantized else 0)
