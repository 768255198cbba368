"""GaLore 8-bit AdamW: bitsandbytes' blockwise 8-bit Adam update applied to projected gradients.

The algorithm is galore-torch's ``GaLoreAdamW8bit``: the low-rank gradient is fed to
bitsandbytes' update with a zero "parameter" of the low-rank shape, whose result (the update)
is projected back and added to the weight; weight decay is applied afterwards. Two defects of
galore-torch's class are avoided: it calls ``torch.cuda.synchronize()`` unconditionally (so it
cannot run on a CPU), and with bitsandbytes >= 0.44 its positional arguments land in the wrong
parameters (``percentile_clipping=100`` becomes ``max_unorm``, ``block_wise=True`` becomes
``skip_zeros``). It also never swaps ``p.data``: the zero tensor is a separate buffer.
"""

from __future__ import annotations

from typing import Any

import torch
from bitsandbytes.optim.optimizer import GlobalOptimManager, Optimizer2State

from optiplug_galore.base import GaLoreMixin, grad_of
from optiplug_galore.projector import project, project_back


class GaLoreAdamW8bit(GaLoreMixin, Optimizer2State):  # type: ignore[misc]  # both load_state_dict: ours wraps torch's
    """8-bit AdamW on low-rank projections of the targeted weights' gradients (see :class:`GaLoreAdamW`)."""

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        min_8bit_size: int = 4096,
    ):
        super().__init__(
            "adam",
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            optim_bits=8,
            min_8bit_size=min_8bit_size,
        )
        # bitsandbytes reads per-parameter overrides from a process-wide manager by (group, index) at the
        # first step, and never clears them: one left by another optimizer (transformers registers every
        # embedding) would turn this optimizer's parameter at that index to 32-bit. This one has its own.
        self.mng = GlobalOptimManager.__new__(GlobalOptimManager)
        self.mng.initialize()

    @torch.no_grad()
    def step_parameters(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        for p in params:
            gindex, pindex, index = self._position(p)
            state = self.state[p]
            if "rank" not in group:
                if "state1" not in state:
                    self.init_state(group, p, gindex, pindex)
                self.update_step(group, p, gindex, pindex)
            else:
                self._step_projected(group, p, state, gindex, pindex, index)
            if p.device.type == "cuda":
                torch.cuda.synchronize(p.device)

    def _step_projected(
        self, group: dict[str, Any], p: torch.Tensor, state: dict, gindex: int, pindex: int, index: int
    ) -> None:
        low = project(state, grad_of(p), group, index, state.get("step", 0))
        update = torch.zeros_like(low)  # bitsandbytes writes "param - lr * adam_update" into it: the update itself
        update.grad = low
        # bitsandbytes keys its state by the tensor it updates: lend it this parameter's state for the call.
        self.state[update] = state
        try:
            if "state1" not in state:
                self.init_state(group, update, gindex, pindex)
            self.update_step({**group, "weight_decay": 0.0}, update, gindex, pindex)
        finally:
            del self.state[update]
        p.add_(project_back(state, update, group))
        if group["weight_decay"] > 0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])
