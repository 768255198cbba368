"""Shapes of APOLLO's projections (no torch: also used by the analytic ``state_bytes``)."""

from __future__ import annotations

from collections.abc import Sequence


def projects_right(shape: Sequence[int], proj_type: str) -> bool:
    """True when an ``m x n`` weight is projected on its right (``G P^T``, ``m x r``), False for the left (``P^T G``).

    ``std`` projects the smaller side (right for tall and square matrices), ``reverse_std`` the
    larger, ``right``/``left`` always that side: apollo-torch's rule.
    """
    tall = int(shape[0]) >= int(shape[1])
    if proj_type == "std":
        return tall
    if proj_type == "reverse_std":
        return not tall
    if proj_type in ("right", "left"):
        return proj_type == "right"
    raise ValueError(f"proj_type must be std, reverse_std, right or left, got {proj_type!r}")


def effective_rank(shape: Sequence[int], rank: int) -> int:
    """The rank used: ``rank`` capped at the smaller side of the matrix (more would cost more than AdamW)."""
    return min(int(rank), int(shape[0]), int(shape[1]))


def low_rank_shape(shape: Sequence[int], rank: int, proj_type: str) -> tuple[int, int]:
    """Shape of the projected gradient (and of the two moments) of an ``m x n`` weight."""
    r = effective_rank(shape, rank)
    return (int(shape[0]), r) if projects_right(shape, proj_type) else (r, int(shape[1]))


def projector_numel(shape: Sequence[int], rank: int, proj_type: str) -> int:
    """Elements of the projection matrix kept for an ``m x n`` weight (``r x n`` right, ``m x r`` left)."""
    r = effective_rank(shape, rank)
    return r * int(shape[1]) if projects_right(shape, proj_type) else int(shape[0]) * r
