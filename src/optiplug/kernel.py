"""The kernel choice of torch's optimizers: one fused kernel, batched ``foreach`` kernels, or a Python loop.

A config field typed :data:`Kernel` (named ``kernel``) holds the choice; :func:`kernel_kwargs` turns it into
the ``fused=``/``foreach=`` keyword arguments for the parameters at hand::

    def build_lion(ctx, cfg):
        groups = ctx.param_groups(cfg.weight_decay)
        return Lion(groups, lr=cfg.lr, betas=cfg.betas, **optiplug.kernel_kwargs(cfg.kernel, groups))

Importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

__all__ = ["Kernel", "kernel_kwargs"]

Kernel = Literal["auto", "fused", "foreach", "for-loop"]
"""torch's kernel choice, the type of a config's ``kernel`` field: one fused kernel, batched ``foreach`` kernels, or
a Python loop."""

# Devices torch.optim's fused Adam/AdamW/SGD kernels support
# (torch/optim/optimizer.py `_get_fused_kernels_supported_devices`).
_FUSED_DEVICES = ("cpu", "cuda", "mps", "xpu")


def _params_of(params_or_groups: Iterable[Any]) -> list[Any]:
    params: list[Any] = []
    for item in params_or_groups:
        if isinstance(item, dict):
            params.extend(item["params"])
        else:
            params.append(item)
    return params


def kernel_kwargs(kernel: str, params_or_groups: Iterable[Any]) -> dict[str, bool]:
    """The ``fused``/``foreach`` keyword arguments of a torch optimizer for ``kernel``.

    Args:
        kernel: a :data:`Kernel` (a config's ``kernel`` field); ``"auto"`` picks ``fused`` when every parameter is a
            floating-point tensor on a device torch's fused kernels support (cpu, cuda, mps, xpu),
            else leaves torch's own default.
        params_or_groups: the parameters, or parameter groups (dicts with ``"params"``).

    Returns:
        Keyword arguments for ``torch.optim.AdamW(...)`` (also Adam, SGD, Adagrad).
    """
    if kernel == "fused":
        return {"fused": True}
    if kernel == "foreach":
        return {"foreach": True, "fused": False}
    if kernel == "for-loop":
        return {"foreach": False, "fused": False}
    if kernel != "auto":
        raise ValueError(f"kernel must be one of auto, fused, foreach, for-loop; got {kernel!r}")
    import torch

    params = _params_of(params_or_groups)
    fusable = bool(params) and all(p.device.type in _FUSED_DEVICES and torch.is_floating_point(p) for p in params)
    # Fused is the fastest correct path on CPU and GPU (benchmarks/core_overhead.py); transformers defaults to it too.
    return {"fused": True} if fusable else {}
