"""Measurements for run summaries, benchmarks and tests: optimizer-state size and peak memory."""

from __future__ import annotations

import resource
import sys
from typing import Any

__all__ = ["optimizer_state_bytes", "tensor_bytes", "peak_rss_bytes", "high_water_mark_bytes", "maxrss_bytes"]


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in ``obj`` (tensors, dicts, lists, tuples, nested), each storage counted once.

    A tensor's whole storage is counted, so views of one buffer (a flat buffer and the
    per-parameter slices of it) count as that buffer. Non-tensor values count nothing.
    """
    import torch

    seen: dict[tuple[Any, ...], int] = {}
    stack = [obj]
    while stack:
        item = stack.pop()
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
    """Bytes of the optimizer's state: every tensor in ``optimizer.state_dict()["state"]``.

    Moments, step counters, projection matrices and whatever else the optimizer keeps per
    parameter (nested dicts and lists are searched), each storage counted once. The
    parameters themselves and the hyper-parameters in ``param_groups`` are not counted.

    Args:
        optimizer: a ``torch.optim.Optimizer`` or anything with a ``state_dict()`` of that shape
            (accelerate's wrapper included).

    Returns:
        The size in bytes; 0 before the first step of an optimizer that creates state lazily.
    """
    return tensor_bytes(optimizer.state_dict().get("state", {}))


def maxrss_bytes(rusage: Any) -> int:
    """``ru_maxrss`` of a ``resource.getrusage`` result in bytes (macOS reports bytes, Linux KiB)."""
    return int(rusage.ru_maxrss) * (1 if sys.platform == "darwin" else 1024)


def high_water_mark_bytes(pid: int | str = "self") -> int | None:
    """``VmHWM`` of a Linux process (the peak RSS of its current program only), or None where unknown."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_bytes() -> int:
    """The peak resident memory of this program so far, in bytes.

    On Linux this is ``VmHWM`` from ``/proc/self/status``: ``getrusage``'s ``ru_maxrss`` also
    keeps the high-water mark of the process image before ``exec``, so a run started from a
    large parent (a benchmark, a test) would report the parent's memory. Elsewhere it is
    ``ru_maxrss``.
    """
    peak = high_water_mark_bytes()
    return peak if peak is not None else maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF))
