"""What the three GaLore optimizers share: per-parameter stepping and exact resume.

Each parameter's update reads only its own gradient and state (its projection is seeded by its
position in the optimizer, :meth:`optiplug.PerParameterOptimizer.parameter_index`), so the entries
declare ``per_parameter=True`` and ``layerwise: true`` is the core's (:mod:`optiplug.layerwise`): it
steps each parameter in its post-accumulate-grad hook through the optimizer's ``step_parameters``, and
makes ``step()`` a no-op. This package keeps no copy of it.
"""

from __future__ import annotations

import math
from typing import Any

import torch

import optiplug
from optiplug_galore.projector import StateProjector


class GaLoreMixin(optiplug.PerParameterOptimizer):
    """Put first among each GaLore optimizer class's bases (before its upstream ``torch.optim.Optimizer``).

    ``step()`` is :class:`optiplug.PerParameterOptimizer`'s: ``step_parameters(group, params)`` per group,
    which each optimizer class writes (``galore_adamw``'s is :class:`optiplug.MatrixOptimizer`'s).
    """

    def _position(self, p: torch.Tensor) -> tuple[int, int, int]:
        """``(group index, index in the group, index in the optimizer)`` of a parameter."""
        return self.parameter_position(p)

    def _index(self, p: torch.Tensor) -> int:
        """The parameter's position in the optimizer (seeds its randomized projections)."""
        return self.parameter_index(p)

    # ---- state ----
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, keeping each saved tensor's dtype (torch casts floating state
        to the parameter's dtype, which would round float32 statistics of a bfloat16 model)."""
        super().load_state_dict(state_dict)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if not isinstance(saved, dict):
                continue
            current = self.state[p]
            for key, value in saved.items():
                now = current.get(key)
                if isinstance(value, torch.Tensor) and isinstance(now, torch.Tensor) and now.dtype != value.dtype:
                    current[key] = value.to(device=p.device, copy=True)

    def _with_projectors(self, group: dict[str, Any], params: list[torch.Tensor]) -> list[dict[str, Any]]:
        """Put a :class:`StateProjector` into each targeted parameter's state (for galore-torch's step code)."""
        injected = []
        if "rank" in group:
            for p in params:
                state = self.state[p]
                state["projector"] = StateProjector(state, group, self._index(p))
                injected.append(state)
        return injected


def grad_of(p: torch.Tensor) -> torch.Tensor:
    """``p.grad``, which the step code only reads for parameters it selected for having one."""
    grad = p.grad
    assert grad is not None, "stepping a parameter without a gradient"
    return grad


def bias_corrected_step_size(lr: float, beta1: float, beta2: float, step: int) -> float:
    """galore-torch's AdamW step size, ``lr * sqrt(1 - beta2^t) / (1 - beta1^t)``, in the same float order."""
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    return lr * math.sqrt(bias_correction2) / bias_correction1
