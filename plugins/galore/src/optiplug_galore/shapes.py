"""Shapes of GaLore's projections (no torch: also used by the analytic ``state_bytes``)."""

from __future__ import annotations

from collections.abc import Sequence


def sides(shape: Sequence[int], proj_type: str) -> tuple[bool, bool]:
    """``(left, right)``: which sides of an ``m x n`` matrix ``proj_type`` projects.

    ``std`` projects the smaller side (right for tall and square matrices, left for wide ones),
    ``reverse_std`` the larger, ``full`` both, as galore-torch decides from the gradient's shape.
    """
    tall = shape[0] >= shape[1]
    if proj_type == "std":
        return (not tall, tall)
    if proj_type == "reverse_std":
        return (tall, not tall)
    if proj_type == "left":
        return (True, False)
    if proj_type == "right":
        return (False, True)
    if proj_type == "full":
        return (True, True)
    raise ValueError(f"proj_type must be std, reverse_std, right, left or full, got {proj_type!r}")


def effective_rank(shape: Sequence[int], rank: int) -> int:
    """The rank actually used: ``rank`` capped at the smaller side of the matrix."""
    return min(int(rank), int(shape[0]), int(shape[1]))


def low_rank_shape(shape: Sequence[int], rank: int, proj_type: str) -> tuple[int, int]:
    """Shape of the projected gradient (and of the optimizer's moments) of an ``m x n`` weight."""
    left, right = sides(shape, proj_type)
    r = effective_rank(shape, rank)
    return (r if left else int(shape[0]), r if right else int(shape[1]))


def projector_numel(shape: Sequence[int], rank: int, proj_type: str) -> int:
    """Elements of the projection matrices kept for an ``m x n`` weight (``m x r`` left, ``r x n`` right)."""
    left, right = sides(shape, proj_type)
    r = effective_rank(shape, rank)
    return (int(shape[0]) * r if left else 0) + (r * int(shape[1]) if right else 0)
