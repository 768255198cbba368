"""GaLore Adafactor: galore-torch's ``GaLoreAdafactor`` step, unchanged, over tensor-only state.

galore-torch's own step code runs; only its projector object is replaced, for the length of
each step, by a :class:`~optiplug_galore.projector.StateProjector` over tensors in the state.
Adafactor runs with an external learning rate (``relative_step=False``,
``scale_parameter=False``), as transformers configures it, so schedules apply.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from galore_torch import GaLoreAdafactor as _GaLoreTorchAdafactor

from optiplug_galore.base import GaLoreMixin


class GaLoreAdafactor(GaLoreMixin, _GaLoreTorchAdafactor):
    """Adafactor on low-rank projections of the targeted weights' gradients (see :class:`GaLoreAdamW`)."""

    param_groups: list[dict[str, Any]]  # galore-torch's base leaves it untyped

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
    ):
        super().__init__(
            params,
            lr=lr,
            eps=eps,
            clip_threshold=clip_threshold,
            decay_rate=decay_rate,
            beta1=beta1,
            weight_decay=weight_decay,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
        )

    @torch.no_grad()
    def step_parameters(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        # galore-torch's step walks self.param_groups: show it just these parameters, with this group's settings.
        groups = self.param_groups
        self.param_groups = [{**group, "params": params}]
        injected = self._with_projectors(group, params)
        try:
            # unwrapped: torch may have wrapped the class's step in its profiling hook (we are under no_grad already)
            inspect.unwrap(_GaLoreTorchAdafactor.step)(self)
        finally:
            self.param_groups = groups
            for state in injected:
                state.pop("projector", None)
