"""GaLore projections whose whole state is plain tensors in the optimizer state.

galore-torch keeps a ``GaLoreProjector`` object per parameter in the optimizer state, which
``torch.load(weights_only=True)`` refuses. Here a parameter's projection is one or two tensors,
``state["proj_left"]`` (m x r, orthonormal columns) and/or ``state["proj_right"]`` (r x n,
orthonormal rows), so a checkpoint holds tensors and numbers only.

``svd`` recomputes them with galore-torch's own ``get_orthogonal_matrix`` (bit-identical
results); ``randomized`` uses a randomized range finder (Halko, Martinsson & Tropp 2011): a
Gaussian test matrix with ``oversampling`` extra columns, ``power_iterations`` rounds of
``G (G^T Q)`` re-orthonormalised by QR, then an exact SVD of the small ``Q^T G``. Its test
matrices are drawn from a generator seeded by (seed, parameter index, step), so a resumed run
draws the same ones without any RNG state in the checkpoint.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch

from optiplug import projection_sides

LEFT, RIGHT = "proj_left", "proj_right"


# ---- computing a projection -----------------------------------------------------------------


def svd_bases(
    grad: torch.Tensor, rank: int, left: bool, right: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """galore-torch's exact SVD bases (its own code), copied out of the full ``U``/``Vh`` buffers."""
    from galore_torch.galore_projector import GaLoreProjector

    kind = "full" if left and right else ("left" if left else "right")
    result = GaLoreProjector.get_orthogonal_matrix(None, grad, rank, kind)
    # galore-torch returns slices of U and Vh: cloning keeps only the r columns/rows (memory, checkpoint size).
    if kind == "full":
        return result[0].clone(), result[1].clone()
    return (result.clone(), None) if left else (None, result.clone())


def randomized_bases(
    grad: torch.Tensor,
    rank: int,
    left: bool,
    right: bool,
    *,
    oversampling: int,
    power_iterations: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Approximate top-``rank`` singular bases of ``grad`` with a randomized range finder.

    Falls back to :func:`svd_bases` when ``rank + oversampling`` reaches the smaller side of the
    matrix (the range finder would then cost as much as the SVD and save nothing).
    """
    m, n = grad.shape
    width = rank + oversampling
    if width >= min(m, n):
        return svd_bases(grad, rank, left, right)
    matrix = grad.float()
    omega = torch.randn(n, width, generator=generator, device=grad.device, dtype=matrix.dtype)
    sample = matrix @ omega
    for _ in range(power_iterations):
        basis = torch.linalg.qr(sample).Q
        basis = torch.linalg.qr(matrix.T @ basis).Q
        sample = matrix @ basis
    basis = torch.linalg.qr(sample).Q  # m x width, orthonormal columns spanning G's dominant range
    u_small, _, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    left_basis = (basis @ u_small[:, :rank]).to(grad.dtype) if left else None
    right_basis = vh[:rank].to(grad.dtype).contiguous() if right else None
    return left_basis, right_basis


def _seed(seed: int, index: int, step: int) -> int:
    return hash((int(seed), int(index), int(step))) & 0x7FFF_FFFF_FFFF_FFFF


def refresh(state: MutableMapping[str, Any], grad: torch.Tensor, group: dict[str, Any], index: int, step: int) -> None:
    """Recompute the projection of one parameter from its gradient ``grad`` and store it in ``state``."""
    left, right = projection_sides(grad.shape, group["proj_type"])
    if group.get("projection", "svd") == "randomized":
        generator = torch.Generator(device=grad.device).manual_seed(_seed(group.get("seed", 0), index, step))
        bases = randomized_bases(
            grad,
            group["rank"],
            left,
            right,
            oversampling=group.get("oversampling", 16),
            power_iterations=group.get("power_iterations", 2),
            generator=generator,
        )
    else:
        bases = svd_bases(grad, group["rank"], left, right)
    for key, basis in zip((LEFT, RIGHT), bases):
        if basis is not None:
            state[key] = basis


# ---- using it -------------------------------------------------------------------------------


def project(
    state: MutableMapping[str, Any], grad: torch.Tensor, group: dict[str, Any], index: int, step: int
) -> torch.Tensor:
    """The low-rank gradient; the projection is recomputed first on every ``update_proj_gap``-th step.

    ``step`` counts this parameter's previous updates (galore-torch's ``state["step"]``).
    """
    if (LEFT not in state and RIGHT not in state) or step % group["update_proj_gap"] == 0:
        refresh(state, grad, group, index, step)
    low = grad
    if LEFT in state:
        low = torch.matmul(state[LEFT].t(), low)
    if RIGHT in state:
        low = torch.matmul(low, state[RIGHT].t())
    return low


def project_back(
    state: MutableMapping[str, Any], low: torch.Tensor, group: dict[str, Any], out: torch.Tensor | None = None
) -> torch.Tensor:
    """The full-rank update of a low-rank one, times ``scale`` (written into ``out`` when given)."""
    left, right = state.get(LEFT), state.get(RIGHT)
    if left is not None and right is not None:
        full = torch.matmul(torch.matmul(left, low), right, out=out)
    elif left is not None:
        full = torch.matmul(left, low, out=out)
    else:
        assert right is not None  # a projected parameter has at least one side
        full = torch.matmul(low, right, out=out)
    return full.mul_(group["scale"])


def projection_error(grad: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None) -> float:
    """Relative Frobenius error ``|G - P(G)| / |G|`` of projecting ``grad`` and back (scale 1)."""
    g = grad.float()
    approx = g
    if left is not None:
        approx = left.float() @ (left.float().T @ approx)
    if right is not None:
        approx = (approx @ right.float().T) @ right.float()
    return float(torch.linalg.norm(g - approx) / torch.linalg.norm(g))


class StateProjector:
    """galore-torch's projector interface (``project``/``project_back``) over tensors in ``state``.

    Put into ``state["projector"]`` only for the length of a galore-torch ``step()`` call, so the
    galore-torch code runs unchanged while the saved state stays tensors and numbers.
    """

    def __init__(self, state: MutableMapping[str, Any], group: dict[str, Any], index: int):
        self.state, self.group, self.index = state, group, index

    def project(self, full_rank_grad: torch.Tensor, iter: int) -> torch.Tensor:
        return project(self.state, full_rank_grad, self.group, self.index, iter)

    def project_back(self, low_rank_grad: torch.Tensor) -> torch.Tensor:
        return project_back(self.state, low_rank_grad, self.group)
