"""One-sided Shampoo on an optiplug.MatrixOptimizer: one process, DDP and FSDP2 from the same three methods."""

import torch

import optiplug


class OneSidedShampoo(optiplug.MatrixOptimizer):
    """SGD with momentum; the matrices of the groups marked ``precondition`` are preconditioned on the left."""

    elementwise_state = ("momentum_buffer",)  # shaped like the parameter: kept per shard, never gathered

    def __init__(self, params, lr=1e-3, momentum=0.9, beta=0.95, eps=1e-6):
        super().__init__(params, dict(lr=lr, momentum=momentum, beta=beta, eps=eps, weight_decay=0.0))

    def is_matrix(self, group, p):
        return group.get("precondition", False) and p.dim() == 2

    def _momentum(self, grad, state, group):
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad)
        return state["momentum_buffer"].mul_(group["momentum"]).add_(grad)

    def matrix_input(self, p, grad, state, group):  # every process, on its shard
        return self._momentum(grad, state, group)

    def matrix_update(self, p, matrix, state, group):  # once per matrix, on the whole momentum
        if "left" not in state:
            rows = matrix.shape[0]
            state["left"] = torch.zeros(rows, rows, dtype=matrix.dtype, device=matrix.device)
        left = state["left"].mul_(group["beta"]).add_(matrix @ matrix.T, alpha=1 - group["beta"])
        values, vectors = torch.linalg.eigh(left)
        root = (vectors * (values.clamp_min(0) + group["eps"]).pow(-0.25)) @ vectors.T
        return root @ matrix

    def apply_update(self, p, update, state, group):  # every process, on its shard
        p.mul_(1 - group["lr"] * group["weight_decay"]).add_(update, alpha=-group["lr"])

    def step_elementwise(self, group, params):  # the other parameters: SGD with momentum
        for p in params:
            update = self._momentum(p.grad, self.state[p], group)
            p.mul_(1 - group["lr"] * group["weight_decay"]).add_(update, alpha=-group["lr"])
