"""Measurements for run summaries, benchmarks and tests: optimizer-state size and peak memory."""

from __future__ import annotations

import resource
import sys
from typing import Any

__all__ = ["optimizer_state_bytes", "tensor_bytes", "peak_rss_bytes"]


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


def peak_rss_bytes() -> int:
    """The peak resident memory of this program so far, in bytes.

    On Linux this is ``VmHWM`` from ``/proc/self/status``: ``getrusage``'s ``ru_maxrss`` also
    keeps the high-water mark of the process image before ``exec``, so a run started from a
    large parent (a benchmark, a test) would report the parent's memory. Elsewhere it is
    ``ru_maxrss`` (bytes on macOS, KiB on other systems).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
