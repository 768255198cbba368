"""What the three GaLore optimizers share: per-parameter stepping and exact resume.

Each parameter's update reads only its own gradient and state (its projection is seeded by its
position), so the entries declare ``per_parameter=True`` and ``layerwise: true`` is the core's
(:mod:`optiplug.layerwise`): it steps each parameter in its post-accumulate-grad hook through
:meth:`GaLoreMixin.step_parameters`, and makes ``step()`` a no-op. This package keeps no copy of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from optiplug_galore.projector import StateProjector


class GaLoreMixin:
    """Mixed into each GaLore optimizer class (before its ``torch.optim.Optimizer`` base)."""

    param_groups: list[dict[str, Any]]
    state: Any

    def _init_galore(self) -> None:
        self._init_galore_positions()

    def _init_galore_positions(self) -> None:
        self._positions: dict[torch.Tensor, tuple[int, int, int]] = {}
        flat = 0
        for gindex, group in enumerate(self.param_groups):
            for pindex, p in enumerate(group["params"]):
                self._positions[p] = (gindex, pindex, flat)
                flat += 1

    def _position(self, p: torch.Tensor) -> tuple[int, int, int]:
        """``(group index, index in the group, index in the optimizer)`` of a parameter."""
        if p not in self._positions:  # a group added with add_param_group
            self._init_galore_positions()
        return self._positions[p]

    def _index(self, p: torch.Tensor) -> int:
        """The parameter's position in the optimizer (seeds its randomized projections)."""
        return self._position(p)[2]

    # ---- stepping ----
    def _step_params(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """Update ``params`` (all in ``group``, each with a gradient) by one step."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step over every parameter with a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._step_params(group, params)
        return loss

    def step_parameters(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """Step just ``params`` (all in ``group``, each with a gradient): ``layerwise: true`` calls it per parameter."""
        with torch.no_grad():
            self._step_params(group, params)

    # ---- state ----
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, keeping each saved tensor's dtype (torch casts floating state
        to the parameter's dtype, which would round float32 statistics of a bfloat16 model)."""
        super().load_state_dict(state_dict)  # type: ignore[misc]
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
