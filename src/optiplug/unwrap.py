"""The optimizer under the wrappers accelerate and DeepSpeed put around it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["unwrap_optimizer"]


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
