"""lomo-optim's ``Lomo`` and ``AdaLomo`` where they fall short in a Trainer: the rate, clipping, devices, resume.

- accelerate runs the fused backward (``Accelerator.lomo_backward``) only when ``backward`` gets a
  ``learning_rate``, which transformers' Trainer passes only for ``args.optim`` lomo/adalomo:
  :func:`backward_with_rate` passes the optimizer's scheduled rate otherwise.
- ``clip_grad_norm`` needs ``grad_norm(loss)`` (a first backward pass) before each fused backward;
  upstream leaves that call to the training loop, which the Trainer does not make: done here.
- lomo-optim 0.1.1's AdaLomo allocates its second moments with ``.cuda()`` (no CPU run at all) and
  keeps them in dicts keyed by parameter name outside ``state``, with the step count in an
  attribute: a checkpoint saves none of it. Here they live on each parameter's device, are also
  ``self.state[p]`` entries (float32, whatever the weight's dtype) and the step count a group key,
  so ``state_dict()`` saves them and ``torch.load(weights_only=True)`` resumes them exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from lomo_optim import AdaLomo as UpstreamAdaLomo
from lomo_optim import Lomo as UpstreamLomo

_MOMENTS = ("exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col")


def backward_with_rate(accelerator: Any, original: Any) -> Any:
    """``accelerator.backward`` that hands a LOMO optimizer its current (scheduled) learning rate."""

    def backward(loss: torch.Tensor, **kwargs: Any) -> Any:
        if "learning_rate" not in kwargs:
            for wrapped in getattr(accelerator, "_optimizers", []):
                inner = getattr(wrapped, "optimizer", wrapped)
                if isinstance(inner, (UpstreamLomo, UpstreamAdaLomo)):
                    kwargs["learning_rate"] = inner.param_groups[0]["lr"]
                    break
        return original(loss, **kwargs)

    return backward


class Lomo(UpstreamLomo):
    """lomo-optim's LOMO, with ``clip_grad_norm`` computed before each fused backward."""

    def fused_backward(self, loss: torch.Tensor, lr: float) -> None:
        if self.clip_grad_norm is not None:
            self.grad_norm(loss)
        super().fused_backward(loss, lr)


class AdaLomo(UpstreamAdaLomo):
    """lomo-optim's AdaLomo on any device, with its moments and step count in the state dict."""

    def __init__(
        self,
        model: torch.nn.Module,
        lr: float = 1e-3,
        loss_scale: float = 2**10,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
        weight_decay: float = 0.0,
    ):
        real_cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]  # moved below
        try:
            super().__init__(
                model,
                lr=lr,
                loss_scale=loss_scale,
                eps=eps,
                clip_threshold=clip_threshold,
                decay_rate=decay_rate,
                clip_grad_norm=clip_grad_norm,
                clip_grad_value=clip_grad_value,
                weight_decay=weight_decay,
            )
        finally:
            torch.Tensor.cuda = real_cuda  # type: ignore[method-assign]
        for name, param in model.named_parameters():
            state = self.state[param]
            for key in _MOMENTS:
                moments = getattr(self, key)
                if name in moments:
                    moments[name] = moments[name].to(param.device)
                    state[key] = moments[name]
        self.param_groups[0]["step_num"] = self.step_num

    def fused_backward(self, loss: torch.Tensor, lr: float) -> None:
        if self.clip_grad_norm is not None:
            self.grad_norm(loss)
        super().fused_backward(loss, lr)
        self.param_groups[0]["step_num"] = self.step_num

    @staticmethod
    def _process_value_according_to_param_policy(param, value, param_id, param_groups, key=None):
        return value.to(device=param.device)  # the moments stay float32 for low-precision weights

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for name, param in self.model.named_parameters():
            for key, value in self.state.get(param, {}).items():
                getattr(self, key)[name] = value
        self.step_num = int(self.param_groups[0].get("step_num", 0))
