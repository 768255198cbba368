"""Shapes of low-rank projections of ``m x n`` weight matrices (GaLore, APOLLO, and any projector of yours).

No torch here: an entry's ``state_bytes`` formula uses the same functions as its optimizer,
so the estimate and the real state cannot disagree about a shape.

A projection replaces an ``m x n`` gradient ``G`` by a low-rank one: ``G P^T`` (``m x r``, projected
on the right by an ``r x n`` matrix ``P``), ``P^T G`` (``r x n``, on the left by an ``m x r`` ``P``),
or both. ``proj_type`` says which side, as galore-torch and apollo-torch read it:

- ``"std"``: the smaller side (right for tall and square matrices, left for wide ones);
- ``"reverse_std"``: the larger side;
- ``"right"`` / ``"left"``: always that side;
- ``"full"``: both sides.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["effective_rank", "low_rank_shape", "projection_sides", "projector_numel"]

PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")


def projection_sides(shape: Sequence[int], proj_type: str) -> tuple[bool, bool]:
    """``(left, right)``: which sides of an ``m x n`` matrix ``proj_type`` projects.

    Raises:
        ValueError: ``proj_type`` is not one of ``std``, ``reverse_std``, ``right``, ``left``, ``full``.
    """
    tall = int(shape[0]) >= int(shape[1])
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
    raise ValueError(f"proj_type must be one of {', '.join(PROJ_TYPES)}, got {proj_type!r}")


def effective_rank(shape: Sequence[int], rank: int) -> int:
    """The rank actually used: ``rank`` capped at the smaller side of the matrix (a larger one saves nothing)."""
    return min(int(rank), int(shape[0]), int(shape[1]))


def low_rank_shape(shape: Sequence[int], rank: int, proj_type: str) -> tuple[int, int]:
    """Shape of the projected gradient of an ``m x n`` weight (and of moments kept in the low-rank space)."""
    left, right = projection_sides(shape, proj_type)
    r = effective_rank(shape, rank)
    return (r if left else int(shape[0]), r if right else int(shape[1]))


def projector_numel(shape: Sequence[int], rank: int, proj_type: str) -> int:
    """Elements of the projection matrices of an ``m x n`` weight (``m x r`` on the left, ``r x n`` on the right)."""
    left, right = projection_sides(shape, proj_type)
    r = effective_rank(shape, rank)
    return (int(shape[0]) * r if left else 0) + (r * int(shape[1]) if right else 0)
