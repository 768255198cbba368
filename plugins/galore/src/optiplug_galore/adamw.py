"""GaLore AdamW: galore-torch's ``GaLoreAdamW`` update, batched with torch's foreach kernels.

The arithmetic is galore-torch's, operation for operation (``exp_avg.mul_(b1).add_(g, 1 - b1)``,
``denom = sqrt(exp_avg_sq) + eps``, ``step_size = lr * sqrt(bc2) / bc1``, the projected-back
update times ``scale``, weight decay ``p -= lr * wd * p`` after the update), so with the
``svd`` projection the results are bit-identical to galore-torch's per-tensor loop. torch's
fused AdamW kernel cannot be used: it places ``eps`` differently (``sqrt(v / bc2) + eps``).

What is faster than galore-torch without changing a bit: the parameters that are not projected
(embeddings, norms, head) go through torch's foreach kernels; a projected weight's full-size
update is written into one buffer per weight shape, reused for the whole step, and scaled in
place (galore-torch allocates two full-size temporaries per weight per step).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import torch
from galore_torch import GaLoreAdamW as _GaLoreTorchAdamW

import optiplug
from optiplug_galore.base import GaLoreMixin, bias_corrected_step_size, grad_of
from optiplug_galore.projector import project, project_back

_CHUNK_ELEMENTS = 1 << 22  # bounds the foreach temporaries (denominators, updates) to 2 x 16 MiB in float32


def _chunks(sizes: list[int]) -> Iterator[list[int]]:
    """Consecutive index ranges of at most ``_CHUNK_ELEMENTS`` elements (at least one tensor each)."""
    chunk: list[int] = []
    total = 0
    for i, size in enumerate(sizes):
        if chunk and total + size > _CHUNK_ELEMENTS:
            yield chunk
            chunk, total = [], 0
        chunk.append(i)
        total += size
    if chunk:
        yield chunk


class GaLoreAdamW(GaLoreMixin, optiplug.MatrixOptimizer, _GaLoreTorchAdamW):
    """AdamW on low-rank projections of the targeted weights' gradients (and plain AdamW elsewhere).

    A parameter group with a ``rank`` key is projected; its other GaLore keys are
    ``update_proj_gap``, ``scale``, ``proj_type``, ``projection``, ``oversampling``,
    ``power_iterations`` and ``seed``. Per parameter the state holds ``step`` (an int),
    ``exp_avg``/``exp_avg_sq`` (low-rank for projected weights) and the projection tensors.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
    ):
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            correct_bias=correct_bias,
            no_deprecation_warning=True,
        )

    # ---- the optiplug.MatrixOptimizer methods: one process, DDP and FSDP2 ----
    def is_matrix(self, group: dict[str, Any], p: torch.Tensor) -> bool:
        return "rank" in group

    def step_elementwise(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """The parameters that are not projected: AdamW with foreach kernels, then weight decay."""
        for p in params:
            if grad_of(p).is_sparse:
                raise RuntimeError("GaLore AdamW does not support sparse gradients")
        self._step_foreach(group, params)
        if group["weight_decay"] > 0.0:
            torch._foreach_add_(params, params, alpha=-group["lr"] * group["weight_decay"])

    def matrix_update(
        self, p: torch.Tensor, matrix: torch.Tensor, state: MutableMapping[str, Any], group: dict[str, Any]
    ) -> torch.Tensor:
        """A projected weight's whole gradient in, its full-rank update (before the step size) out.

        The projection (refreshed every ``update_proj_gap`` steps: an SVD or a randomized range finder of
        the whole gradient), the low-rank moments and the projection back, as galore-torch. Under FSDP2
        this runs once per matrix, on its owner process.
        """
        if matrix.is_sparse:
            raise RuntimeError("GaLore AdamW does not support sparse gradients")
        beta1, beta2 = group["betas"]
        step = state.setdefault("step", 0)
        grad = project(state, matrix, group, self._index(p), step)
        exp_avg, exp_avg_sq, step = self._moments(state, grad)
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = exp_avg_sq.sqrt().add_(group["eps"])
        # one full-size output per weight shape, reused until the end of the step (galore-torch allocates two)
        key = (tuple(matrix.shape), grad.dtype, matrix.device)
        buffers = self.__dict__.setdefault("_update_buffers", {})
        if key not in buffers:
            buffers[key] = torch.empty(matrix.shape, dtype=grad.dtype, device=matrix.device)
        return project_back(state, exp_avg / denom, group, out=buffers[key])

    def apply_update(
        self, p: torch.Tensor, update: torch.Tensor, state: MutableMapping[str, Any], group: dict[str, Any]
    ) -> None:
        """The bias-corrected step, then weight decay (after the update, as galore-torch)."""
        p.add_(update, alpha=-self._step_size(group, state["step"]))
        if group["weight_decay"] > 0.0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])

    def step_parameters(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        try:
            super().step_parameters(group, params)
        finally:
            self.__dict__.pop("_update_buffers", None)  # freed after each call, as galore-torch's temporaries

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        try:
            return super().step(closure)
        finally:
            self.__dict__.pop("_update_buffers", None)

    def _step_size(self, group: dict[str, Any], step: int) -> float:
        beta1, beta2 = group["betas"]
        return bias_corrected_step_size(group["lr"], beta1, beta2, step) if group["correct_bias"] else group["lr"]

    def _moments(self, state: MutableMapping[str, Any], grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        state["step"] += 1
        return state["exp_avg"], state["exp_avg_sq"], state["step"]

    def _step_foreach(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        beta1, beta2 = group["betas"]
        grads, exp_avgs, exp_avg_sqs, steps = [], [], [], []
        for p in params:
            state = self.state[p]
            state.setdefault("step", 0)
            grad = grad_of(p)
            exp_avg, exp_avg_sq, step = self._moments(state, grad)
            grads.append(grad)
            exp_avgs.append(exp_avg)
            exp_avg_sqs.append(exp_avg_sq)
            steps.append(step)
        for chunk in _chunks([g.numel() for g in grads]):
            g = [grads[i] for i in chunk]
            m = [exp_avgs[i] for i in chunk]
            v = [exp_avg_sqs[i] for i in chunk]
            torch._foreach_mul_(m, beta1)
            torch._foreach_add_(m, g, alpha=1.0 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, g, g, value=1.0 - beta2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_add_(denom, group["eps"])
            updates = torch._foreach_div(m, denom)
            del denom
            by_step: dict[int, list[int]] = defaultdict(list)
            for j, i in enumerate(chunk):
                by_step[steps[i]].append(j)
            for step, members in by_step.items():
                torch._foreach_add_(
                    [params[chunk[j]] for j in members],
                    [updates[j] for j in members],
                    alpha=-self._step_size(group, step),
                )
