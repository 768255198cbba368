"""Optimizer-state sizes: analytic ones for an entry's ``state_bytes``, and the measured state to test them against.

Importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optiplug.context import ParamShape

__all__ = ["STEP_BYTES", "adam_state_bytes", "moment_bytes", "optimizer_state_bytes", "tensor_bytes"]

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
    parameters nor ``param_groups``. Test an entry's ``state_bytes`` against it.
    Returns 0 before the first step of an optimizer that creates its state lazily.
    """
    return tensor_bytes(optimizer.state_dict().get("state", {}))
