"""Helpers for plugin authors: the Adam-family fields, one kernel chooser, state sizes, unwrapping.

Every shipped plugin uses these instead of a copy of its own, and a third-party plugin should
too (they are exported from :mod:`optiplug`)::

    class LionConfig(optiplug.AdamFields):
        name: Literal["lion"] = "lion"
        lr: optiplug.LearningRate = 1e-4          # a new default keeps the lr > 0 check
        betas: optiplug.Betas = (0.9, 0.99)       # a new default keeps the [0, 1) check
        kernel: optiplug.Kernel = "auto"

    def build_lion(ctx, cfg):
        groups = ctx.param_groups(cfg.weight_decay)
        return Lion(groups, lr=cfg.lr, betas=cfg.betas, **optiplug.kernel_kwargs(cfg.kernel, groups))

Importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field

from optiplug.configs import OptimizerConfig

if TYPE_CHECKING:
    from optiplug.context import ParamShape

__all__ = [
    "STEP_BYTES",
    "TRAINING_ARGUMENT_FIELDS",
    "AdamFields",
    "Betas",
    "Kernel",
    "LearningRate",
    "adam_state_bytes",
    "kernel_kwargs",
    "moment_bytes",
    "optimizer_state_bytes",
    "tensor_bytes",
    "unwrap_optimizer",
]

Beta = Annotated[float, Field(ge=0.0, lt=1.0)]
Betas = Annotated[
    tuple[Beta, Beta],
    Field(description="Coefficients of the running averages of the gradient and its square, each in [0, 1)."),
]
"""Two betas, each in [0, 1): the type carries the check, so a new default keeps it."""

LearningRate = Annotated[
    float, Field(gt=0.0, allow_inf_nan=False, description="Learning rate (the peak of the schedule).")
]
"""A finite learning rate > 0."""

Kernel = Literal["auto", "fused", "foreach", "for-loop"]
"""torch's implementation choice: one fused kernel, batched ``foreach`` kernels, or a Python loop."""

# Devices torch.optim's fused Adam/AdamW/SGD kernels support
# (torch/optim/optimizer.py `_get_fused_kernels_supported_devices`).
_FUSED_DEVICES = ("cpu", "cuda", "mps", "xpu")


class AdamFields(OptimizerConfig):
    """Base for configs of Adam-family optimizers: ``lr``, ``betas``, ``eps``, ``weight_decay`` with their checks.

    Subclass it and add ``name: Literal[...]``; re-declare a field to change its default
    (``lr: optiplug.LearningRate = 3e-4``) and the check comes with the type.
    """

    lr: LearningRate = 1e-3
    betas: Betas = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0, description="Term added to the denominator for numerical stability.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay (not applied to biases and norms).")


def _params_of(params_or_groups: Iterable[Any]) -> list[Any]:
    params: list[Any] = []
    for item in params_or_groups:
        if isinstance(item, dict):
            params.extend(item["params"])
        else:
            params.append(item)
    return params


def kernel_kwargs(choice: str, params_or_groups: Iterable[Any]) -> dict[str, bool]:
    """The ``fused``/``foreach`` keyword arguments of a torch optimizer for ``choice``.

    Args:
        choice: a :data:`Kernel`; ``"auto"`` picks ``fused`` when every parameter is a
            floating-point tensor on a device torch's fused kernels support (cpu, cuda, mps, xpu),
            else leaves torch's own default.
        params_or_groups: the parameters, or parameter groups (dicts with ``"params"``).

    Returns:
        Keyword arguments for ``torch.optim.AdamW(...)`` (also Adam, SGD, Adagrad).
    """
    if choice == "fused":
        return {"fused": True}
    if choice == "foreach":
        return {"foreach": True, "fused": False}
    if choice == "for-loop":
        return {"foreach": False, "fused": False}
    if choice != "auto":
        raise ValueError(f"kernel must be one of auto, fused, foreach, for-loop; got {choice!r}")
    import torch

    params = _params_of(params_or_groups)
    fusable = bool(params) and all(p.device.type in _FUSED_DEVICES and torch.is_floating_point(p) for p in params)
    # Fused is the fastest correct path on CPU and GPU (benchmarks/core_overhead.py); transformers defaults to it too.
    return {"fused": True} if fusable else {}


STEP_BYTES = 4
"""torch keeps each parameter's ``step`` as a float32 scalar tensor (4 bytes)."""


def moment_bytes(shapes: Sequence[ParamShape], per_element: float = 1.0, scalars: int = 1) -> int:
    """State of ``per_element`` buffers the size of each parameter plus ``scalars`` float32 scalars per parameter."""
    return sum(int(per_element * s.numel * s.itemsize) + scalars * STEP_BYTES for s in shapes)


def adam_state_bytes(shapes: Sequence[ParamShape], cfg: Any = None) -> int:
    """Adam-family state: two moments and a step per parameter (three moments with ``cfg.amsgrad``).

    Usable directly as an entry's ``state_bytes``.
    """
    return moment_bytes(shapes, 3 if getattr(cfg, "amsgrad", False) else 2)


def unwrap_optimizer(optimizer: Any, *, until: Callable[[Any], bool] | None = None) -> Any:
    """The optimizer under accelerate's ``AcceleratedOptimizer`` (or, with ``until``, the one you look for).

    Args:
        optimizer: what the Trainer holds (``trainer.optimizer``, a callback's ``optimizer``).
        until: look for the outermost optimizer for which ``until(optimizer)`` is true, following
            ``.optimizer`` through any wrapper (accelerate's, DeepSpeed's ZeRO optimizers), and
            return it, or None when none is (``until=lambda o: hasattr(o, "switch_block")``).

    Returns:
        Without ``until``: the optimizer inside ``AcceleratedOptimizer`` (the one to build schedulers
        on). accelerate's DeepSpeed wrapper is left as it is: under DeepSpeed the Trainer's
        optimizer is DeepSpeed's, which holds the partitioned state and its ``state_dict``.
    """
    if until is None:
        while type(optimizer).__name__ == "AcceleratedOptimizer" and hasattr(optimizer, "optimizer"):
            optimizer = optimizer.optimizer
        return optimizer
    for _ in range(8):  # wrappers nest a few deep at most; a cycle must not hang
        if optimizer is None or until(optimizer):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in ``obj`` (tensors, dicts, lists, tuples, nested), each storage counted once.

    A tensor's whole storage is counted, so views of one buffer (a flat buffer and the
    per-parameter slices of it) count as that buffer. Non-tensor values count nothing. A DTensor
    (FSDP2's parameters and optimizer state) counts the shard this process holds.
    """
    import torch

    seen: dict[tuple[Any, ...], int] = {}
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor) and callable(getattr(item, "to_local", None)):
            item = item.to_local()  # type: ignore[attr-defined]  # a DTensor: this process's shard
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            pointer = storage.data_ptr()
            # Meta tensors (and empty ones) have no address: count them by identity.
            key = (str(item.device), pointer) if pointer else ("id", id(item))
            seen[key] = storage.nbytes() if pointer else item.numel() * item.element_size()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set)):
            stack.extend(item)
    return sum(seen.values())


def optimizer_state_bytes(optimizer: Any) -> int:
    """Measured bytes of the optimizer's state: every tensor in ``optimizer.state_dict()["state"]``.

    Moments, step counters, projection matrices and whatever else the optimizer keeps per
    parameter (nested dicts and lists are searched), each storage counted once; not the
    parameters nor ``param_groups``. Test an entry's analytic ``state_bytes`` against it.
    Returns 0 before the first step of an optimizer that creates its state lazily.
    """
    return tensor_bytes(optimizer.state_dict().get("state", {}))


TRAINING_ARGUMENT_FIELDS: dict[str, tuple[str, int | None]] = {
    "learning_rate": ("lr", None),
    "weight_decay": ("weight_decay", None),
    "adam_beta1": ("betas", 0),
    "adam_beta2": ("betas", 1),
    "adam_epsilon": ("eps", None),
}
"""``TrainingArguments`` field -> (optimizer config field, index in it or None): the one table of what the
optimizer section owns, used by the run config (conflicts are errors) and the trainer (defaults from ``args``)."""


def training_argument_value(cfg: Any, key: str) -> Any:
    """The value ``cfg`` holds for the ``TrainingArguments`` field ``key`` (None: the config has no such field)."""
    field, index = TRAINING_ARGUMENT_FIELDS[key]
    value = getattr(cfg, field, None)
    if value is None or index is None:
        return value
    return value[index]
