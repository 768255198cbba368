"""APOLLO AdamW: apollo-torch's ``APOLLOAdamW`` update with a state of tensors and numbers only.

The arithmetic is apollo-torch's, operation for operation, so the results are bit-identical to it
(tested): a targeted weight's gradient ``G`` is projected to ``R`` (``G P^T`` or ``P^T G``), AdamW's
moments of ``R`` give ``N = m / (sqrt(v) + eps)``, and ``G`` itself is scaled by
``|N| / (|R| + 1e-8)`` per channel (the rows or columns not projected) or per tensor, by
``sqrt(scale)``, and by Fira's norm-growth limiter; the step size carries Adam's bias correction.
Every other parameter gets that AdamW update unprojected.

What differs from apollo-torch, none of it in the arithmetic:

- apollo-torch keeps a projector *object* in each weight's state, which
  ``torch.load(weights_only=True)`` refuses; here the state is ``step`` and ``seed`` (ints), the
  moments, ``proj`` (the projection matrix) and ``scaled_grad_norm`` (the limiter's last norm).
  The random projection is drawn with apollo-torch's own ``stable_randn``/``next_seed`` from the
  saved seed, so a resumed run draws the very matrices the uninterrupted run would have.
- Channel-wise scaling follows the side actually projected; apollo-torch decides it from the
  shape alone, so ``proj_type`` ``reverse_std``/``left``/``right`` fail on it (``channel``) with
  a shape error or scale the wrong axis.
- ``svd`` keeps only the ``r`` singular vectors (apollo-torch keeps a view of the whole ``U``/``Vh``).
- The limiter's ``max(ratio, 1.01)`` is computed on the device (apollo-torch's Python ``max`` on a
  tensor waits for the device once per weight per step), with the same values.
- The rank is capped at the smaller side of each matrix.

Each parameter's update depends only on its own gradient and state (its seed is fixed at
construction), so stepping any subset of the parameters, one at a time or all together, gives
the same result as one full step: the optimizer is per-parameter safe.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, MutableMapping, Sequence
from typing import Any

import torch

import optiplug

PROJECTED_KEYS = ("rank", "proj", "proj_type", "scale_type", "update_proj_gap", "scale")
"""A parameter group with these keys gets APOLLO's update (the same keys as apollo-torch's groups)."""

_LIMIT = 1.01  # Fira's norm-growth limiter: at most 1.01x growth per step
_TINY = 1e-8  # apollo-torch's guard in the scaling factor and the limiter


def _projects_right(shape: Sequence[int], proj_type: str) -> bool:
    """True when the weight is projected on its right (``G P^T``, ``m x r``), False for the left (``P^T G``)."""
    return optiplug.projection_sides(shape, proj_type)[1]


def _random_projection(grad: torch.Tensor, rank: int, right: bool, seed: int) -> torch.Tensor:
    """apollo-torch's ``GradientProjector.get_orthogonal_matrix``: Gaussian entries of variance ``1/rank``."""
    from apollo_torch.random_projector import stable_randn

    shape = (rank, grad.shape[1]) if right else (grad.shape[0], rank)
    matrix_dtype = torch.float32  # apollo-torch draws in float32 and casts to the gradient's dtype
    proj = stable_randn(shape, seed=seed, device=grad.device, dtype=matrix_dtype) / math.sqrt(rank)
    return proj if grad.dtype == torch.float32 else proj.to(grad.device).type(grad.dtype)


def _svd_projection(grad: torch.Tensor, rank: int, right: bool) -> torch.Tensor:
    """apollo-torch's ``GaLoreProjector.get_orthogonal_matrix`` (its own code), keeping only the ``r`` vectors."""
    from apollo_torch.svd_projector import GaLoreProjector

    basis = GaLoreProjector.get_orthogonal_matrix(None, grad, rank, "right" if right else "left")
    # A slice of U or Vh: own just the r vectors, in the slice's memory order (the products then round
    # exactly as apollo-torch's do; LAPACK's factors are column-major).
    if basis.dim() == 2 and basis.stride(0) == 1 and basis.stride(1) != 1:
        return basis.t().contiguous().t()
    return basis.clone() if basis.is_contiguous() else basis.contiguous()


class ApolloAdamW(optiplug.MatrixOptimizer):
    """AdamW with APOLLO's approximate gradient scaling on the groups that carry the APOLLO keys.

    A parameter group with ``rank``, ``proj`` (``random``/``svd``), ``proj_type``, ``scale_type``
    (``channel``/``tensor``), ``update_proj_gap`` and ``scale`` is APOLLO's; the others get AdamW.
    ``scale_front`` and ``norm_growth_limiter`` may be set per group too.

    Args:
        params: parameters or parameter groups.
        lr, betas, eps, weight_decay, correct_bias: AdamW's (decoupled weight decay, apollo-torch's
            defaults: ``eps=1e-6``).
        scale_front: multiply by ``sqrt(scale)`` before the norm-growth limiter (else after).
        norm_growth_limiter: Fira's limiter (apollo-torch's ``disable_nl=False``).
        seeds: one seed per parameter, in the order of the groups; by default apollo-torch's, the
            1-based position in the groups.
    """

    elementwise_state = ()  # every targeted weight's state is its matrix state (low-rank, the projection)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        scale_front: bool = False,
        norm_growth_limiter: bool = True,
        seeds: Sequence[int] | None = None,
    ):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr} - should be >= 0.0")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"Invalid beta parameters: {betas} - each should be in [0.0, 1.0)")
        if eps < 0.0:
            raise ValueError(f"Invalid epsilon value: {eps} - should be >= 0.0")
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "correct_bias": correct_bias,
            "scale_front": scale_front,
            "norm_growth_limiter": norm_growth_limiter,
        }
        super().__init__(params, defaults)
        count = sum(len(group["params"]) for group in self.param_groups)
        if seeds is not None and len(seeds) != count:
            raise ValueError(f"seeds: expected one per parameter ({count}), got {len(seeds)}")
        # By position in the optimizer, fixed at construction: never derived from which parameters step, so a
        # step is per-parameter safe, and the same in every process (also when FSDP2 swaps the parameters).
        self._seeds = [int(s) for s in seeds] if seeds is not None else list(range(1, count + 1))

    def _seed_of(self, p: torch.Tensor) -> int:
        index = self.parameter_index(p)
        # a group added later with add_param_group: apollo-torch's rule (the 1-based position), continued
        return self._seeds[index] if index < len(self._seeds) else index + 1

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's, after putting a checkpoint's groups into this optimizer's order.

        Up to optiplug 0.1 (commit 6f05005) each of ``ctx.param_groups`` was followed by its APOLLO part;
        now every plain part comes first (:func:`optiplug.split_param_groups`). Both orders list the
        plain parts, and the APOLLO parts, in the same order, so a stable sort by "has the APOLLO keys"
        turns an old checkpoint's groups into the new order and changes nothing in a new one.
        """
        groups = sorted(state_dict["param_groups"], key=lambda group: "rank" in group)
        super().load_state_dict({**state_dict, "param_groups": groups})

    # ---- the optiplug.MatrixOptimizer methods: one process, DDP and FSDP2 ----
    def is_matrix(self, group: dict[str, Any], p: torch.Tensor) -> bool:
        return "rank" in group and p.dim() == 2

    def step_elementwise(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """The parameters without APOLLO's scaling: AdamW, one parameter at a time (apollo-torch's arithmetic)."""
        for p in params:
            state = self.state[p]
            update = self._adam(state, self._grad(p), group)
            self.apply_update(p, update, state, group)

    def matrix_update(
        self, p: torch.Tensor, matrix: torch.Tensor, state: MutableMapping[str, Any], group: dict[str, Any]
    ) -> torch.Tensor:
        """A targeted weight's whole gradient in, its scaled gradient (before the step size) out.

        Projection (drawn again every ``update_proj_gap`` steps), the low-rank AdamW moments, and the
        channel- or tensor-wise scaling of the gradient. Under FSDP2 it runs once per matrix, on its owner.
        """
        if matrix.is_sparse:
            raise RuntimeError("APOLLO AdamW does not support sparse gradients")
        if "step" not in state:
            state["step"] = 0
        low = self._project(p, matrix, group, state)
        update = self._adam(state, low, group)
        return self._scaled_gradient(matrix, low, update, group, state)

    def apply_update(
        self, p: torch.Tensor, update: torch.Tensor, state: MutableMapping[str, Any], group: dict[str, Any]
    ) -> None:
        """The bias-corrected step, then decoupled weight decay."""
        step_size = group["lr"]
        if group["correct_bias"]:
            beta1, beta2 = group["betas"]
            bias_correction1 = 1.0 - beta1 ** state["step"]
            bias_correction2 = 1.0 - beta2 ** state["step"]
            step_size = step_size * math.sqrt(bias_correction2) / bias_correction1
        p.add_(update, alpha=-step_size)
        if group["weight_decay"] > 0.0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])

    @staticmethod
    def _grad(p: torch.Tensor) -> torch.Tensor:
        grad = p.grad
        assert grad is not None, "stepping a parameter without a gradient"
        if grad.is_sparse:
            raise RuntimeError("APOLLO AdamW does not support sparse gradients")
        return grad

    @staticmethod
    def _adam(state: MutableMapping[str, Any], grad: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """AdamW's moments of ``grad`` (the low-rank gradient of a targeted weight): ``m / (sqrt(v) + eps)``."""
        if "step" not in state:
            state["step"] = 0
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        beta1, beta2 = group["betas"]
        state["step"] += 1
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = exp_avg_sq.sqrt().add_(group["eps"])
        return exp_avg / denom

    def _project(
        self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any], state: MutableMapping[str, Any]
    ) -> torch.Tensor:
        """The low-rank gradient; the projection is drawn (or recomputed) first on every ``update_proj_gap``-th step."""
        right = _projects_right(grad.shape, group["proj_type"])
        if "proj" not in state or state["step"] % group["update_proj_gap"] == 0:
            rank = optiplug.effective_rank(grad.shape, group["rank"])
            if group["proj"] == "random":
                from apollo_torch.random_projector import next_seed

                seed = state.get("seed", self._seed_of(p))
                state["proj"] = _random_projection(grad, rank, right, seed)
                state["seed"] = next_seed(seed)
            elif group["proj"] == "svd":
                state["proj"] = _svd_projection(grad, rank, right)
            else:
                raise ValueError(f"proj must be 'random' or 'svd', got {group['proj']!r}")
        proj = state["proj"]
        return torch.matmul(grad, proj.t()) if right else torch.matmul(proj.t(), grad)

    def _scaled_gradient(
        self,
        grad: torch.Tensor,
        low: torch.Tensor,
        update: torch.Tensor,
        group: dict[str, Any],
        state: MutableMapping[str, Any],
    ) -> torch.Tensor:
        """The full-rank gradient scaled as the low-rank AdamW update scales its projection (APOLLO's steps 3-4)."""
        if group["scale_type"] == "channel":
            dim = 1 if _projects_right(grad.shape, group["proj_type"]) else 0
            factor = torch.norm(update, dim=dim) / (torch.norm(low, dim=dim) + _TINY)
            if dim == 1:
                factor = factor.unsqueeze(1)
        elif group["scale_type"] == "tensor":
            factor = torch.norm(update) / (torch.norm(low) + _TINY)
        else:
            raise ValueError(f"scale_type must be 'channel' or 'tensor', got {group['scale_type']!r}")
        del update
        scaled = grad * factor  # the one full-size temporary of the step
        root_scale = math.sqrt(group["scale"])
        if group["scale_front"]:
            scaled *= root_scale
        if group["norm_growth_limiter"]:
            norm = torch.norm(scaled)
            previous = state.get("scaled_grad_norm")
            if previous is None:
                state["scaled_grad_norm"] = norm
            else:
                ratio = norm / (previous + _TINY)
                # apollo-torch's max(ratio, 1.01) / 1.01, without reading the ratio back to the host
                limiter = torch.where(ratio < _LIMIT, 1.0, ratio / _LIMIT)
                scaled.div_(limiter)
                state["scaled_grad_norm"] = norm / limiter
        if not group["scale_front"]:
            scaled *= root_scale
        return scaled
