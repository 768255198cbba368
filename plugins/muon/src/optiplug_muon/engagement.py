"""Did Muon do what the routing said? Newton–Schulz counted where it runs, confirmed after the first step.

Silent fallbacks are the failure users report with Muon at scale: DeepSpeed's ZeRO-0 path once
ran Muon's groups as plain SGD, ``zero.Init`` once made every matrix look 1-D so none reached
Muon, and a framework that hands an optimizer flat partitions runs AdamW on everything without
a word. So the functions that orthogonalize (torch's ``_zeropower_via_newtonschulz``, DeepSpeed's
``muon_update``) are wrapped once per process with a counter that records each call and its
multiply-add work, and after the first step each Muon optimizer compares what ran, summed over
the processes, with what its routing and its engine say should have: a mismatch stops the run
with one line instead of training something that is not Muon.

No torch at import: the wrappers are installed by the optimizers that need them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optiplug

__all__ = ["EngagementError", "Tally", "confirm", "count_calls", "newton_schulz_flops", "record", "tally"]

logger = logging.getLogger("transformers.trainer.muon")


class EngagementError(optiplug.OptiplugError):
    """After its first step, Muon orthogonalized a different number of matrices than the routing sent it."""


@dataclass
class Tally:
    """Newton–Schulz work done in this process: calls (one per matrix) and floating-point operations."""

    calls: int = 0
    flops: int = 0


tally = Tally()
"""This process's running total (every thread): read it before and after the work you want to measure."""


def newton_schulz_flops(rows: int, cols: int, steps: int = 5) -> int:
    """FLOPs of ``steps`` quintic Newton–Schulz iterations on a ``rows x cols`` matrix.

    Per iteration on ``X`` (``m x n``, ``m <= n`` after the transpose): ``A = X X^T`` (2 m^2 n),
    ``A A`` (2 m^3), ``B X`` (2 m^2 n).
    """
    m, n = sorted((int(rows), int(cols)))
    return steps * (4 * m * m * n + 2 * m**3)


def record(rows: int, cols: int, steps: int) -> None:
    """Count one Newton–Schulz orthogonalization of a ``rows x cols`` matrix in :data:`tally`."""
    tally.calls += 1
    tally.flops += newton_schulz_flops(rows, cols, steps)


def count_calls(module: Any, name: str, shape_of: Callable[..., tuple[int, int]], steps_of: Callable[..., int]) -> None:
    """Wrap ``module.name`` once so every call adds to :data:`tally` (it computes, returns and raises as before).

    Args:
        module: the module whose attribute callers look up when they run (so they see the wrapper).
        name: the function's name in it.
        shape_of: ``(rows, cols)`` of the matrix a call orthogonalizes, from the call's arguments.
        steps_of: its number of Newton–Schulz iterations, from the call's arguments.
    """
    current = getattr(module, name)
    if getattr(current, "_optiplug_counted", False):
        return

    @functools.wraps(current)
    def counted(*args: Any, **kwargs: Any) -> Any:
        record(*shape_of(*args, **kwargs), steps_of(*args, **kwargs))
        return current(*args, **kwargs)

    counted._optiplug_counted = True  # type: ignore[attr-defined]
    setattr(module, name, counted)


def confirm(
    done: int, expected: int, routed: int, engine: str, *, collective: bool = False, device: Any = None
) -> list[int]:
    """Compare the matrices orthogonalized in the first step with the number expected; stop the run if they differ.

    Args:
        done: orthogonalizations this process ran in the step (from :data:`tally`).
        expected: orthogonalizations this process should have run, by its routing and engine.
        routed: matrices the routing sent to Muon (the whole model), for the message.
        engine: the engine in words (``"DeepSpeed ZeRO-2"``), for the message.
        collective: sum ``done`` and ``expected`` over the processes first (an engine that shares the matrices
            out); every process must then call it, as every process steps.
        device: where the sum is taken (the parameters' device; CPU with gloo).

    Returns:
        The orthogonalizations each process ran (one number without ``collective``).

    Raises:
        EngagementError: none ran, or a different number than expected; the message says what happened.
    """
    per_rank = [done]
    done_total, expected_total = done, expected
    if collective:
        import torch

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
            counts = torch.zeros(2 * world, dtype=torch.int64, device=device)
            counts[2 * rank], counts[2 * rank + 1] = done, expected
            torch.distributed.all_reduce(counts)
            per_rank = [int(n) for n in counts[0::2].tolist()]
            done_total, expected_total = int(counts[0::2].sum()), int(counts[1::2].sum())
    split = f" ({' + '.join(str(n) for n in per_rank)} on {len(per_rank)} processes)" if len(per_rank) > 1 else ""
    # A step that a loss scaler skipped (fp16 overflow) did its Newton–Schulz work too: whole multiples pass.
    if done_total == 0 or expected_total == 0 or done_total % expected_total:
        raise EngagementError(
            f"muon: the first step ran Newton–Schulz {done_total} times{split} under {engine}, where the routing "
            f"({routed} matrices to Muon) needs {expected_total}: Muon is not running as configured, and the run stops "
            "rather than train something else under its name; please report it with your torch and engine versions"
        )
    logger.info(
        "muon: the first step ran Newton–Schulz %d times%s under %s for the %d matrices routed to Muon",
        done_total,
        split,
        engine,
        routed,
    )
    return per_rank
