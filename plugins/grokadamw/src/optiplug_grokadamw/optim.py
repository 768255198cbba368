"""``GrokAdamW``: grokadamw's update, with its state where torch keeps state, so a checkpoint resumes.

grokadamw 0.1.2 keeps each parameter's moments in ``param_groups[i]["state"]``, a dict keyed by the
parameter tensors. ``state_dict()`` then saves a copy of every parameter as a key and loading it
restores a dict keyed by the *loaded* tensors, which no live parameter equals: a resumed run starts
its moments from zero, silently. Here the state lives in ``self.state[p]`` (``state_dict()`` saves it
by index, ``torch.load(weights_only=True)`` reads it) and the update is grokadamw's, operation for
operation (bit-identical on CPU). Its other defects avoided here: the state is moved to the CPU and
back on every step, the update runs under the deprecated ``torch.cuda.amp.autocast`` (a warning on
every step, no effect on its elementwise operations), and importing it calls
``logging.basicConfig(level=INFO)`` on the root logger (undone by :func:`upstream_class`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch


def upstream_class() -> type:
    """grokadamw's ``GrokAdamW``, imported without leaving its root-logger configuration behind."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from grokadamw import GrokAdamW as Upstream

    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    return Upstream


class GrokAdamW(torch.optim.Optimizer):
    """grokadamw's GrokAdamW with its state in ``self.state`` (see the module docstring)."""

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        alpha_init: float = 0.98,
        lamb: float = 2.0,
        gamma: float = 0.1,
        grokking_signal_decay_rate: float = 0.1,
        gradient_clipping: float = 1.0,
    ):
        upstream_class()  # the package is a dependency: fail here, not at the first step, if it is missing
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            alpha_init=alpha_init,
            lamb=lamb,
            gamma=gamma,
            grokking_signal_decay_rate=grokking_signal_decay_rate,
            gradient_clipping=gradient_clipping,
        )
        super().__init__(params, defaults)

    @staticmethod
    def grokking_signal(group: dict[str, Any]) -> float:
        """grokadamw's default signal: how far the eval loss is above the train loss, relative (0 without both)."""
        train, evaluation = group.get("train_loss"), group.get("eval_loss")
        if train is None or evaluation is None:
            return 0.0
        worst = max(evaluation, train)
        return max(0, evaluation - train) / worst if worst > 0 else 0.0

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            signal = self.grokking_signal(group)
            params = [p for p in group["params"] if p.grad is not None]
            beta1, beta2 = group["betas"]
            for i, p in enumerate(params):  # the position among the group's parameters with a gradient: grokadamw's
                grad = p.grad
                state = self.state[p]
                if not state:
                    state.update(
                        step=0,
                        exp_avg=torch.zeros_like(p),
                        exp_avg_sq=torch.zeros_like(p),
                        grok_ema=torch.zeros_like(p),
                    )
                state["step"] += 1
                if group["gradient_clipping"] > 0:
                    torch.nn.utils.clip_grad_norm_(p, group["gradient_clipping"])
                layer_beta1 = beta1 * (1 - group["gamma"]) ** i
                alpha = group["alpha_init"] * math.exp(-group["grokking_signal_decay_rate"] * signal)
                state["grok_ema"].mul_(alpha).add_(grad, alpha=1 - alpha)
                grok_grad = grad + group["lamb"] * state["grok_ema"]
                state["exp_avg"].mul_(layer_beta1).add_(grok_grad, alpha=1 - layer_beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grok_grad, grok_grad, value=1 - beta2)
                step_size = group["lr"] * math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.addcdiv_(state["exp_avg"], state["exp_avg_sq"].sqrt().add_(group["eps"]), value=-step_size)
        return loss
