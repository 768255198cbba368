"""Peak-memory measurements for run summaries, compare and benchmarks (optimizer state: ``optiplug.state_sizes``)."""

from __future__ import annotations

import resource
import sys
from typing import Any

__all__ = ["high_water_mark_bytes", "maxrss_bytes", "peak_rss_bytes"]


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
