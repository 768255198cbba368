"""``MuonWithAdamW``: torch's Muon on the hidden matrices and torch's AdamW on the rest, as ONE optimizer.

One ``torch.optim.Optimizer`` holds every parameter group, each flagged ``use_muon``; the
Trainer, accelerate's wrapper and the learning-rate scheduler see a single optimizer whose
``param_groups`` are all the groups (the scheduler scales Muon's and AdamW's learning rates
alike), and whose ``state_dict()``/``load_state_dict()`` carry both halves in one
``weights_only``-safe dict (tensors, numbers, strings, tuples).

* Muon groups are stepped with torch's functional ``muon`` (what ``torch.optim.Muon.step``
  calls): for ``adjust_lr`` ``original`` and ``match_rms_adamw`` the call is exactly
  ``torch.optim.Muon``'s, so the result is bit-identical to it. ``spectral``
  (lr * sqrt(fan_out / fan_in)) equals ``original`` for fan_out >= fan_in; for a wide matrix the
  learning rate is scaled by sqrt(fan_out / fan_in) and the weight decay applied here with the
  unscaled rate, as torch applies it. A transformers ``Conv1D`` weight (GPT-2) is stepped through
  its transpose, so its fans are read the right way round.
* AdamW groups are stepped by a real ``torch.optim.AdamW`` (fused where supported) whose
  ``param_groups`` are the same dict objects and whose ``state`` is this optimizer's state.
  Loading a state dict replaces the group dicts, so the inner AdamW is re-wired after each load.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.optim._muon
from torch.optim._muon import muon as _torch_muon  # the functional torch.optim.Muon.step runs

from optiplug_muon import engagement

__all__ = ["MuonWithAdamW", "lr_scale"]


def lr_scale(adjust_lr: str, fan_out: int, fan_in: int) -> float:
    """The factor Muon's learning rate is multiplied by for a ``fan_out x fan_in`` weight matrix."""
    if adjust_lr == "original":
        return math.sqrt(max(1.0, fan_out / fan_in))
    if adjust_lr == "match_rms_adamw":
        return 0.2 * math.sqrt(max(fan_out, fan_in))
    if adjust_lr == "spectral":
        return math.sqrt(fan_out / fan_in)
    raise ValueError(f"adjust_lr must be 'original', 'match_rms_adamw' or 'spectral', got {adjust_lr!r}")


def _ns_shape(grad: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[int, int]:
    return int(grad.shape[0]), int(grad.shape[1])


def _ns_steps(grad: torch.Tensor, ns_coefficients: Any = None, ns_steps: int = 5, *args: Any, **kwargs: Any) -> int:
    return int(ns_steps)


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon on the parameters of the ``use_muon`` groups, AdamW on the others.

    Args:
        muon_groups: parameter groups for Muon (dicts with ``params``; every parameter 2-D). A
            group may set ``transposed: True`` for weights stored as ``(fan_in, fan_out)``.
        adamw_groups: parameter groups for AdamW (dicts with ``params`` and ``weight_decay``).
        lr, momentum, nesterov, ns_coefficients, ns_eps, ns_steps, adjust_lr, weight_decay: Muon's
            settings (``ns_eps`` is torch.optim.Muon's ``eps``).
        adamw_lr, adamw_betas, adamw_eps: AdamW's settings; AdamW's weight decay is each group's own.
        adamw_kernel: ``fused``/``foreach`` keyword arguments for ``torch.optim.AdamW``.

    Attributes:
        routing: the factory's :class:`optiplug_muon.Routing` (what went where), or None.
    """

    routing: Any = None

    def __init__(
        self,
        muon_groups: Sequence[dict[str, Any]],
        adamw_groups: Sequence[dict[str, Any]] = (),
        *,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315),
        ns_eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr: str = "original",
        weight_decay: float = 0.0,
        adamw_lr: float = 3e-2,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_kernel: dict[str, bool] | None = None,
    ):
        lr_scale(adjust_lr, 1, 1)  # validates the name
        muon = {
            "use_muon": True,
            "lr": lr,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_coefficients": tuple(ns_coefficients),
            "ns_eps": ns_eps,
            "ns_steps": ns_steps,
            "adjust_lr": adjust_lr,
            "weight_decay": weight_decay,
            "transposed": False,
        }
        groups = [{**muon, **group} for group in muon_groups]
        groups += [{"use_muon": False, "lr": adamw_lr, **group} for group in adamw_groups]
        for group in groups:
            if group["use_muon"]:
                for p in group["params"]:
                    if p.ndim != 2:
                        raise ValueError(f"Muon trains 2-D weight matrices only, got a parameter of {tuple(p.shape)}")
        super().__init__(groups, {})
        engagement.count_calls(torch.optim._muon, "_zeropower_via_newtonschulz", _ns_shape, _ns_steps)
        self._confirmed = False
        self._adamw: torch.optim.AdamW | None = None
        adamw = [group for group in self.param_groups if not group["use_muon"]]
        if adamw:
            # Adds AdamW's settings (betas, eps, fused, ...) to the same group dicts: they are saved with them.
            kernel = adamw_kernel or {}
            self._adamw = torch.optim.AdamW(adamw, lr=adamw_lr, betas=adamw_betas, eps=adamw_eps, **kernel)
        self._wire()

    def _wire(self) -> None:
        """Point the inner AdamW at this optimizer's AdamW group dicts and its state."""
        if self._adamw is not None:
            self._adamw.param_groups = [group for group in self.param_groups if not group["use_muon"]]
            self._adamw.state = self.state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_adamw" in self.__dict__:  # load_state_dict replaced the group dicts (unpickling sets _adamw after)
            self._wire()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step: Muon on the ``use_muon`` groups, then AdamW on the others."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        calls = engagement.tally.calls
        expected = 0
        for group in self.param_groups:
            if group["use_muon"]:
                expected += self._muon_step(group)
        if not self._confirmed and expected:  # each process orthogonalizes every matrix it has a gradient for
            self._confirmed = True
            routed = len(self.routing.muon) if self.routing is not None else expected
            engine = "DDP" if torch.distributed.is_available() and torch.distributed.is_initialized() else "one process"
            engagement.confirm(engagement.tally.calls - calls, expected, routed, engine)
        if self._adamw is not None:
            self._adamw_lr_used = float(self._adamw.param_groups[0]["lr"])
            self._adamw.step()
        return loss

    def _muon_step(self, group: dict[str, Any]) -> int:
        """Step the group's matrices that have a gradient; returns how many."""
        stepped = 0
        for p in group["params"]:
            if p.grad is None:
                continue
            if torch.is_complex(p):
                raise RuntimeError("Muon does not support complex parameters")
            if p.grad.is_sparse:
                raise RuntimeError("Muon does not support sparse gradients")
            # A transposed (Conv1D) weight is stepped as its (fan_out, fan_in) transpose, with a contiguous
            # gradient copy and momentum buffer in that layout: the same arithmetic, bit for bit, as nn.Linear's.
            param, grad = (p.T, p.grad.T.contiguous()) if group["transposed"] else (p, p.grad)
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
            buffer = state["momentum_buffer"]
            lr, weight_decay, adjust = group["lr"], group["weight_decay"], group["adjust_lr"]
            if adjust == "spectral":
                fan_out, fan_in = param.shape
                adjust = "original"  # sqrt(max(1, fan_out/fan_in)): spectral's factor when fan_out >= fan_in
                if fan_out < fan_in:  # original's factor is 1 here: scale the rate, decay with the unscaled one
                    param.mul_(1.0 - lr * weight_decay)
                    lr, weight_decay = lr * math.sqrt(fan_out / fan_in), 0.0
            _torch_muon(
                [param],
                [grad],
                [buffer],
                lr=lr,
                weight_decay=weight_decay,
                momentum=group["momentum"],
                nesterov=group["nesterov"],
                ns_coefficients=group["ns_coefficients"],
                eps=group["ns_eps"],
                ns_steps=group["ns_steps"],
                adjust_lr_fn=adjust,
                has_complex=False,
            )
            stepped += 1
        return stepped

    def log_values(self) -> dict[str, float]:
        """AdamW's learning rate in the last step, for the Trainer's log (its ``learning_rate`` is Muon's, also
        the rate of the step just taken, read before the scheduler moves on)."""
        if self._adamw is None:
            return {}
        used = getattr(self, "_adamw_lr_used", None)
        return {"adamw_learning_rate": float(self._adamw.param_groups[0]["lr"]) if used is None else used}
