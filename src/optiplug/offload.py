"""``optimizer.offload: cpu``: any per-parameter optimizer's state and step on the CPU (torchao's CPUOffloadOptimizer).

torchao's ``CPUOffloadOptimizer`` keeps a pinned CPU copy of each large parameter, copies its
gradient to the CPU as soon as backward produces it, steps a one-parameter optimizer there and
copies the weight back; tensors under 4096 elements stay with an on-device optimizer. It builds
those optimizers from a class, so the core builds the entry's optimizer as usual (its groups carry
every option) and gives torchao a factory that rebuilds that class on one group: correct for an
optimizer whose steps depend only on its groups' options and its per-parameter state, which is what
``per_parameter=True`` declares.

torchao asserts CUDA or XPU parameters: on a CPU-only machine (and so in this project's CI) the
wrapping is refused with a sentence; what runs here is the check and :func:`one_group_factory`.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from optiplug.errors import ConfigError

if TYPE_CHECKING:
    from optiplug.context import BuildContext
    from optiplug.entries import OptimizerEntry

__all__ = ["check_offload", "offloaded", "one_group_factory"]

DEVICES = ("cuda", "xpu")
"""Where torchao's CPUOffloadOptimizer accepts parameters."""


def check_offload(entry: OptimizerEntry, ctx: BuildContext, cfg: Any) -> None:
    """Refuse ``offload: cpu`` where it cannot train, with one sentence (nothing to check otherwise)."""
    if getattr(cfg, "offload", None) != "cpu":
        return
    name = cfg.name
    if not entry.per_parameter:
        raise ConfigError(
            f"{name} with offload: cpu is not possible: torchao's CPU offload steps each parameter with its own "
            "optimizer, and the entry does not declare per_parameter=True; remove optimizer.offload"
        )
    if getattr(cfg, "layerwise", False):
        raise ConfigError(f"{name}: offload: cpu and layerwise: true both step each parameter on their own; choose one")
    if ctx.distributed != "none":
        raise ConfigError(
            f"{name} with offload: cpu: torchao's CPU offload is for one process (its copies are per process); "
            "remove optimizer.offload under distributed training, or use DeepSpeed's offload_optimizer"
        )
    device = ctx.device_type
    if device not in DEVICES:
        raise ConfigError(
            f"{name} with offload: cpu moves the optimizer's state and step from the accelerator to the CPU, and the "
            f"model is on {device} (torchao's CPUOffloadOptimizer needs CUDA or XPU parameters): remove "
            "optimizer.offload"
        )
    try:
        importlib.metadata.distribution("torchao")
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"{name} with offload: cpu needs torchao's CPUOffloadOptimizer: pip install optiplug-torchao"
        ) from None


def one_group_factory(optimizer: Any) -> Callable[..., Any]:
    """A constructor of ``type(optimizer)`` on a list of groups, each group carrying every option (as torchao
    calls it: ``factory([{"params": p, **group}])``). Options are copied from ``optimizer``'s first group for
    keys a group lacks."""
    cls, template = type(optimizer), dict(optimizer.param_groups[0])
    template.pop("params", None)

    def build(groups: list[dict[str, Any]], **kwargs: Any) -> Any:
        return cls([{**template, **group} for group in groups], **kwargs)

    return build


def offloaded(optimizer: Any, *, offload_gradients: bool = False) -> Any:
    """torchao's ``CPUOffloadOptimizer`` over ``optimizer``'s groups, stepping ``type(optimizer)`` on the CPU.

    The optimizer the entry built is dropped (it holds no state before its first step)."""
    from torchao.optim import CPUOffloadOptimizer

    groups = [dict(group) for group in optimizer.param_groups]
    return CPUOffloadOptimizer(groups, one_group_factory(optimizer), offload_gradients=offload_gradients)
