"""torchao's low-bit AdamW with a ``weights_only``-safe state dict (imports torchao: import it inside factories).

torchao keeps each quantized moment as a tensor subclass (``OptimState8bit``, ``OptimState4bit``,
``OptimStateFp8``). ``torch.load(weights_only=True)``, which the Trainer uses to resume, refuses
those classes, so these optimizers write each one as a dict of plain tensors (its codes, scales
and map) tagged with its format, and rebuild it on load. Only the three formats are accepted: a
checkpoint cannot name another class.
"""

from __future__ import annotations

from typing import Any

import torch
from torchao.optim import AdamW4bit as _AdamW4bit
from torchao.optim import AdamW8bit as _AdamW8bit
from torchao.optim import AdamWFp8 as _AdamWFp8
from torchao.optim.subclass_4bit import OptimState4bit
from torchao.optim.subclass_8bit import OptimState8bit
from torchao.optim.subclass_fp8 import OptimStateFp8

import optiplug
from optiplug_torchao.config import (
    LowBitAdamWFields,
    TorchaoAdamW4bitConfig,
    TorchaoAdamW8bitConfig,
    TorchaoAdamWFp8Config,
)

FORMAT_KEY = "optiplug_torchao_format"
FORMATS: dict[str, type[torch.Tensor]] = {
    "8bit": OptimState8bit,
    "4bit": OptimState4bit,
    "fp8": OptimStateFp8,
}


def pack(value: Any) -> Any:
    """A quantized state tensor as a dict of plain tensors and values; anything else unchanged."""
    for tag, cls in FORMATS.items():
        if type(value) is cls:
            names, attributes = value.__tensor_flatten__()  # type: ignore[attr-defined]
            return {FORMAT_KEY: tag, "attributes": list(attributes), **{n: getattr(value, n) for n in names}}
    return value


def unpack(value: Any) -> Any:
    """The quantized state tensor :func:`pack` wrote; anything else unchanged.

    Raises:
        optiplug.CheckpointError: the dict names a format this plugin does not write.
    """
    if not (isinstance(value, dict) and FORMAT_KEY in value):
        return value
    cls = FORMATS.get(value[FORMAT_KEY])
    if cls is None:
        raise optiplug.CheckpointError(
            f"optimizer state of format {value[FORMAT_KEY]!r} is not one optiplug-torchao writes "
            f"({', '.join(FORMATS)}): the checkpoint was not written by this plugin"
        )
    names = cls.tensor_attrs  # type: ignore[attr-defined]
    return cls.__tensor_unflatten__({n: value[n] for n in names}, value["attributes"], None, None)  # type: ignore[attr-defined]


class _PlainStateDict:
    """Mixin: the state dict holds plain tensors only (``weights_only``-safe)."""

    def state_dict(self) -> dict[str, Any]:
        packed = super().state_dict()  # type: ignore[misc]
        packed["state"] = {i: {k: pack(v) for k, v in s.items()} for i, s in packed["state"].items()}
        return packed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = {i: {k: unpack(v) for k, v in s.items()} for i, s in state_dict["state"].items()}
        super().load_state_dict({**state_dict, "state": state})  # type: ignore[misc]


class AdamW8bit(_PlainStateDict, _AdamW8bit):
    """torchao's AdamW8bit with a plain state dict."""


class AdamW4bit(_PlainStateDict, _AdamW4bit):
    """torchao's AdamW4bit with a plain state dict."""


class AdamWFp8(_PlainStateDict, _AdamWFp8):
    """torchao's AdamWFp8 with a plain state dict."""


CLASSES: dict[type[LowBitAdamWFields], type[Any]] = {
    TorchaoAdamW8bitConfig: AdamW8bit,
    TorchaoAdamW4bitConfig: AdamW4bit,
    TorchaoAdamWFp8Config: AdamWFp8,
}


def build(ctx: optiplug.BuildContext, cfg: LowBitAdamWFields) -> torch.optim.Optimizer:
    """The torchao optimizer ``cfg`` names, on ``ctx``'s decay and no-decay groups."""
    return CLASSES[type(cfg)](
        ctx.param_groups(cfg.weight_decay),
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        amsgrad=cfg.amsgrad,
        block_size=cfg.block_size,
        bf16_stochastic_round=cfg.bf16_stochastic_round,
    )
