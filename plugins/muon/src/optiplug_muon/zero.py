"""Muon under DeepSpeed: DeepSpeed's own ``MuonWithAuxAdam``, with optiplug's routing.

DeepSpeed 0.19.8 runs Muon inside its ZeRO optimizers, where each gradient is still a whole
matrix: ZeRO-1/2 orthogonalize the reduced gradient of each Muon matrix that overlaps a
process's partition (``get_flat_partition``) and hand the optimizer the flat update; ZeRO-3
gathers each Muon matrix's gradient, orthogonalizes a round-robin share of them on each process
and scatters the updates back (``_muon_update_sub_group``); without ZeRO (stage 0) the
optimizer's own ``step`` does it. All of them recognise their Muon by
``isinstance(optimizer, MuonWithAuxAdam)`` and each parameter's ``use_muon`` attribute, and
treat a parameter group as all-Muon or all-Adam by its first parameter.

So the client optimizer here is a ``MuonWithAuxAdam`` whose groups and ``use_muon`` tags come
from optiplug's routing (a DeepSpeed config naming ``"optimizer": {"type": "muon"}`` would make
DeepSpeed tag by its own name heuristic instead); its Adam half is a real ``torch.optim.AdamW``,
as in the single-process optimizer, and its Newton–Schulz is DeepSpeed's ``standard`` quintic
iteration in bfloat16 (torch.optim.Muon's), not its default ``gram`` one in float16.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import deepspeed.runtime.zero.muon.muon_optimizer as muon_optimizer
import deepspeed.runtime.zero.muon.original_muon as original_muon
import torch
from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

from optiplug_muon import engagement
from optiplug_muon.engagement import logger

__all__ = ["NS_METHOD", "DeepSpeedMuonWithAdamW", "layer_shape"]

NS_METHOD = "standard"
"""DeepSpeed's quintic Newton–Schulz in bfloat16, torch.optim.Muon's iteration (DeepSpeed's default is ``gram``)."""

NS_STEPS = 5
"""DeepSpeed's callers never pass ``ns_steps``: its default."""


def _update_shape(grad: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[int, int]:
    return int(grad.shape[-2]), int(grad.shape[-1])


def _update_steps(*args: Any, **kwargs: Any) -> int:
    return int(kwargs.get("ns_steps", args[4] if len(args) > 4 else NS_STEPS))


def layer_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The parameter's shape as a layer (a ZeRO-3 partitioned parameter keeps it in ``ds_shape``)."""
    return tuple(getattr(param, "ds_shape", None) or param.shape)


class DeepSpeedMuonWithAdamW(MuonWithAuxAdam):
    """DeepSpeed's ``MuonWithAuxAdam`` built from optiplug's routing, for ``deepspeed.initialize``.

    Args:
        muon_groups: parameter groups of 2-D matrices for Muon (dicts with ``params``; other keys kept).
        adamw_groups: parameter groups for AdamW (dicts with ``params`` and ``weight_decay``).
        lr, momentum, weight_decay: Muon's settings (DeepSpeed's fixed choices for the rest: ``original``
            lr scale, Nesterov, 5 Newton–Schulz steps).
        adamw_lr, adamw_betas, adamw_eps: AdamW's settings; AdamW's weight decay is each group's own.
        adamw_kernel: ``fused``/``foreach`` keyword arguments for ``torch.optim.AdamW``.
        zero_stage: the DeepSpeed config's ZeRO stage (0 to 3): where Newton–Schulz runs, for the first
            step's engagement check.

    Attributes:
        routing: the factory's :class:`optiplug_muon.Routing`, or None.
    """

    routing: Any = None

    def __init__(
        self,
        muon_groups: Sequence[dict[str, Any]],
        adamw_groups: Sequence[dict[str, Any]] = (),
        *,
        lr: float = 0.02,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
        adamw_lr: float = 3e-2,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_kernel: dict[str, bool] | None = None,
        zero_stage: int = 2,
    ):
        muon = {"use_muon": True, "lr": lr, "momentum": momentum, "weight_decay": weight_decay, "ns_method": NS_METHOD}
        adamw = {"use_muon": False, "lr": adamw_lr, "betas": tuple(adamw_betas), "eps": adamw_eps}
        groups = [{**muon, **group} for group in muon_groups] + [{**adamw, **group} for group in adamw_groups]
        self._muon_params = [p for group in groups if group["use_muon"] for p in group["params"]]
        for group in groups:
            for p in group["params"]:
                if group["use_muon"] and len(layer_shape(p)) != 2:
                    raise ValueError(f"Muon trains 2-D weight matrices only, got a parameter of {layer_shape(p)}")
                p.use_muon = group["use_muon"]  # what DeepSpeed's optimizers read
        # ZeRO-1/2/3 import muon_update from original_muon when they run; MuonWithAuxAdam.step (stage 0) has
        # its own module-level name for it.
        for module in (original_muon, muon_optimizer):
            engagement.count_calls(module, "muon_update", _update_shape, _update_steps)
        super().__init__(groups, adam_optimizer=torch.optim.AdamW, adam_optimizer_kwargs=adamw_kernel or {})
        self.zero_stage = int(zero_stage)
        self._calls_before = engagement.tally.calls
        self._confirmed = False

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, step_id: int | None = None) -> Any:
        """DeepSpeed's step; after the first, :func:`engagement.confirm` checks that Newton–Schulz ran as routed.

        ZeRO-1/2 call it once per group (``param_groups`` narrowed to that group) and ZeRO-3 once per
        sub-group, both after orthogonalizing every Muon matrix of the step; stage 0 orthogonalizes in it.
        """
        adamw = [group for group in self.param_groups if not group["use_muon"]]
        if adamw:
            self._adamw_lr_used = float(adamw[0]["lr"])
        loss = super().step(closure, step_id=step_id)
        if not self._confirmed:
            self._confirmed = True
            self._confirm()
        return loss

    def _confirm(self) -> None:
        if self.zero_stage == 3:  # a round-robin share on each process: each matrix once in all
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            expected = len(self._muon_params) if rank == 0 else 0
        elif self.zero_stage in (1, 2):  # each matrix that overlaps this process's partition (DeepSpeed links those)
            expected = sum(getattr(p, "_hp_mapping", None) is not None for p in self._muon_params)
        else:  # stage 0: every process orthogonalizes every matrix in step(), as under DDP
            expected = len(self._muon_params)
        engine = f"DeepSpeed ZeRO-{self.zero_stage}"
        routed = len(self.routing.muon) if self.routing is not None else len(self._muon_params)
        done = engagement.tally.calls - self._calls_before
        per_rank = engagement.confirm(
            done, expected, routed, engine, collective=True, device=self._muon_params[0].device
        )
        if self.zero_stage == 3 and len(per_rank) > 1 and max(per_rank) > 1.5 * sum(per_rank) / len(per_rank):
            largest = max(int(torch.Size(layer_shape(p)).numel()) for p in self._muon_params)
            logger.warning(
                "muon: DeepSpeed ZeRO-3 ran Newton–Schulz %s times on the %d processes: it shares out the Muon "
                "matrices of each reduce bucket, and zero_optimization.reduce_bucket_size holds fewer matrices than "
                'processes (transformers\' "auto" is hidden_size^2), so one process does the work of all; set it to '
                "at least %d (processes x the largest Muon matrix)",
                " + ".join(str(n) for n in per_rank),
                len(per_rank),
                len(per_rank) * largest,
            )

    def log_values(self) -> dict[str, float]:
        """AdamW's learning rate in the last step (the Trainer logs group 0's, Muon's)."""
        used = getattr(self, "_adamw_lr_used", None)
        return {} if used is None else {"adamw_learning_rate": used}
