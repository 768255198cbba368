"""What the three GaLore optimizers share: per-parameter stepping, layerwise mode, exact resume.

Layerwise mode steps each parameter inside its post-accumulate-grad hook and frees its gradient
right away, so a step never holds every gradient at once. It is one ordinary optimizer (not a
dummy wrapper around per-parameter optimizers): its ``param_groups`` are the groups the hooks
read their learning rate from, so any scheduler built on it drives every parameter, and its
``state_dict()`` holds every parameter's state.

- Gradient accumulation: a hook steps only at the accumulation boundary, as told by
  ``should_sync()`` (inside a Trainer, ``accelerator.sync_gradients``) or, without one, by
  counting backward passes. Until then the gradient accumulates in ``.grad`` as usual.
- Clipping: a global norm would need every gradient at once, which is what layerwise mode
  avoids holding; so each parameter's gradient is clipped to ``max_grad_norm`` on its own.
- The logged gradient norm is the true global norm before clipping, assembled from the
  per-parameter norms (:meth:`GaLoreMixin.layerwise_grad_norm`).
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from optiplug_galore.projector import StateProjector

# parameter -> (hook handle, weakref to its optimizer); torch's dictionary compares tensor keys by identity
_HOOKS = WeakTensorKeyDictionary()


@dataclass
class _Layerwise:
    accumulation_steps: int = 1
    should_sync: Callable[[], bool] | None = None
    max_grad_norm: float | None = None
    backward_passes: dict[torch.Tensor, int] = field(default_factory=dict)
    steps: dict[torch.Tensor, int] = field(default_factory=dict)
    norm_step: int = 0
    norm_squares: torch.Tensor | None = None


def _on_grad_ready(optimizer_ref: weakref.ref, param: torch.Tensor) -> None:
    optimizer = optimizer_ref()
    if optimizer is not None and optimizer._layerwise is not None:
        optimizer._layerwise_step(param)


def layerwise_owner(params: Iterable[torch.Tensor]) -> GaLoreMixin | None:
    """The layerwise GaLore optimizer stepping any of ``params`` in its hooks, or None."""
    for p in params:
        entry = _HOOKS.get(p)
        if entry is not None:
            optimizer = entry[1]()
            if optimizer is not None and optimizer._layerwise is not None:
                return optimizer
    return None


class GaLoreMixin:
    """Mixed into each GaLore optimizer class (before its ``torch.optim.Optimizer`` base)."""

    param_groups: list[dict[str, Any]]
    state: Any

    def _init_galore(self) -> None:
        self._layerwise: _Layerwise | None = None
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
        """One optimizer step over every parameter with a gradient (a no-op in layerwise mode,
        where the parameters are stepped by their hooks during backward)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._layerwise is None:
            for group in self.param_groups:
                params = [p for p in group["params"] if p.grad is not None]
                if params:
                    self._step_params(group, params)
        return loss

    # ---- layerwise mode ----
    def enable_layerwise(
        self,
        *,
        accumulation_steps: int = 1,
        should_sync: Callable[[], bool] | None = None,
        max_grad_norm: float | None = None,
    ) -> None:
        """Step each parameter in its post-accumulate-grad hook from now on.

        Args:
            accumulation_steps: backward passes per optimizer step, counted per parameter when
                ``should_sync`` is None.
            should_sync: called in each hook; True at the accumulation boundary (a Trainer's
                ``accelerator.sync_gradients``).
            max_grad_norm: clip each parameter's gradient to this norm before its step (None: no clipping).
        """
        self._layerwise = _Layerwise(max(1, int(accumulation_steps)), should_sync, max_grad_norm or None)
        ref = weakref.ref(self)
        for group in self.param_groups:
            for p in group["params"]:
                previous = _HOOKS.pop(p, None)
                if previous is not None:  # another optimizer built on this model before: only one may step it
                    previous[0].remove()
                handle = p.register_post_accumulate_grad_hook(functools.partial(_on_grad_ready, ref))
                _HOOKS[p] = (handle, ref)

    def disable_layerwise(self) -> None:
        """Remove the hooks; ``step()`` steps every parameter again."""
        for group in self.param_groups:
            for p in group["params"]:
                entry = _HOOKS.get(p)
                if entry is not None and entry[1]() is self:
                    entry[0].remove()
                    del _HOOKS[p]
        self._layerwise = None

    @property
    def layerwise(self) -> bool:
        return self._layerwise is not None

    def _layerwise_step(self, p: torch.Tensor) -> None:
        lw = self._layerwise
        assert lw is not None
        if lw.should_sync is not None:
            boundary = bool(lw.should_sync())
        else:
            lw.backward_passes[p] = lw.backward_passes.get(p, 0) + 1
            boundary = lw.backward_passes[p] % lw.accumulation_steps == 0
        if not boundary or p.grad is None:
            return
        step = lw.steps[p] = lw.steps.get(p, 0) + 1
        if lw.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_([p], lw.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad])
        square = norm.detach().float().square()
        if step > lw.norm_step or lw.norm_squares is None:
            lw.norm_step, lw.norm_squares = step, square
        else:
            lw.norm_squares = lw.norm_squares + square
        gindex = self._position(p)[0]
        with torch.no_grad():
            self._step_params(self.param_groups[gindex], [p])
        p.grad = None

    def layerwise_grad_norm(self) -> torch.Tensor:
        """The global L2 norm, before clipping, of the gradients of the latest layerwise step."""
        lw = self._layerwise
        if lw is None or lw.norm_squares is None:
            return torch.tensor(0.0)
        return lw.norm_squares.sqrt()

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
