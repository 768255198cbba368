"""``MuonWithAdamW``: torch's Muon on the hidden matrices and torch's AdamW on the rest, as ONE optimizer.

One ``torch.optim.Optimizer`` holds every parameter group, each flagged ``use_muon``; the
Trainer, accelerate's wrapper and the learning-rate scheduler see a single optimizer whose
``param_groups`` are all the groups (the scheduler scales Muon's and AdamW's learning rates
alike), and whose ``state_dict()``/``load_state_dict()`` carry both halves in one
``weights_only``-safe dict (tensors, numbers, strings, tuples).

It is an :class:`optiplug.MatrixOptimizer`: each Muon matrix's step is split in three, so that
under FSDP2 (``fully_shard``, DTensor parameters) the core runs the middle one once per matrix,
on one owner process, and each process keeps only its row shard of the momentum:

1. ``matrix_input`` (elementwise, every process): the momentum, and Nesterov's blend;
2. ``matrix_update`` (whole matrix, once): Newton–Schulz, and the matrix's learning-rate factor;
3. ``apply_update`` (elementwise, every process): decoupled weight decay, then the step.

In one process and under DDP the three run in a row on each matrix, with exactly the operations
of torch's ``torch.optim.Muon.step`` (``_single_tensor_muon``), so for ``adjust_lr`` ``original``
and ``match_rms_adamw`` the result is bit-identical to it. ``spectral`` (lr * sqrt(fan_out /
fan_in)) equals ``original`` for fan_out >= fan_in; for a wide matrix the learning rate is scaled
by sqrt(fan_out / fan_in) and the weight decay uses the unscaled rate, as torch applies it. A
transformers ``Conv1D`` weight (GPT-2) is orthogonalized as its contiguous transpose, so its fans
are read the right way round; its momentum is kept as the weight is stored (checkpoints of
0.1.0 kept it transposed: :meth:`MuonWithAdamW.load_state_dict` turns them).

``ns_dtype`` ``bfloat16`` runs torch's own Newton–Schulz (bfloat16, as torch.optim.Muon);
``float32`` runs the same iteration in float32 (slower on GPUs, but steps that agree to float
rounding across engines: the sharded tests use it).

AdamW groups are stepped by a real ``torch.optim.AdamW`` (fused where supported) on this
optimizer's group dicts and state, one group at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any

import torch
import torch.optim._muon

import optiplug
from optiplug_muon import engagement

__all__ = ["MOMENTUM_LAYOUT", "MuonWithAdamW", "lr_scale", "newton_schulz"]

MOMENTUM_LAYOUT = "momentum_layout"
"""Group key: ``"parameter"`` when a transposed group's momentum has its parameter's layout (0.1.0 transposed it)."""


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


def _is_dtensor(tensor: Any) -> bool:
    """True for an FSDP2 (``fully_shard``) parameter."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without distributed support
        return False
    return isinstance(tensor, DTensor)


def newton_schulz(
    matrix: torch.Tensor, coefficients: Sequence[float], steps: int, eps: float, dtype: str = "bfloat16"
) -> torch.Tensor:
    """The quintic Newton–Schulz orthogonalization of ``matrix`` (a new tensor; ``matrix`` is left as it is).

    ``bfloat16``: torch's own ``_zeropower_via_newtonschulz`` (what torch.optim.Muon runs, counted by
    :mod:`optiplug_muon.engagement`). ``float32``: the same operations in float32, counted likewise.
    """
    a, b, c = coefficients
    if dtype == "bfloat16":
        return torch.optim._muon._zeropower_via_newtonschulz(matrix, (a, b, c), steps, eps)
    if dtype != "float32":
        raise ValueError(f"ns_dtype must be 'bfloat16' or 'float32', got {dtype!r}")
    engagement.record(int(matrix.shape[0]), int(matrix.shape[1]), steps)
    x = matrix.to(torch.float32, copy=True)
    if matrix.size(0) > matrix.size(1):
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if matrix.size(0) > matrix.size(1) else x


class MuonWithAdamW(optiplug.MatrixOptimizer):
    """Muon on the parameters of the ``use_muon`` groups, AdamW on the others.

    Args:
        muon_groups: parameter groups for Muon (dicts with ``params``; every parameter 2-D). A
            group may set ``transposed: True`` for weights stored as ``(fan_in, fan_out)``.
        adamw_groups: parameter groups for AdamW (dicts with ``params`` and ``weight_decay``).
        lr, momentum, nesterov, ns_coefficients, ns_eps, ns_steps, adjust_lr, weight_decay: Muon's
            settings (``ns_eps`` is torch.optim.Muon's ``eps``).
        ns_dtype: ``bfloat16`` (torch's Newton–Schulz) or ``float32``.
        adamw_lr, adamw_betas, adamw_eps: AdamW's settings; AdamW's weight decay is each group's own.
        adamw_kernel: ``fused``/``foreach`` keyword arguments for ``torch.optim.AdamW``.

    Attributes:
        routing: the factory's :class:`optiplug_muon.Routing` (what went where), or None.
    """

    routing: Any = None
    elementwise_state = ("momentum_buffer",)
    _adamw_lr_used: float | None = None

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
        ns_dtype: str = "bfloat16",
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
            "ns_dtype": ns_dtype,
            "adjust_lr": adjust_lr,
            "weight_decay": weight_decay,
            "transposed": False,
            MOMENTUM_LAYOUT: "parameter",
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

    # ---- Muon: the three parts of a matrix's step (optiplug.MatrixOptimizer) ----
    def is_matrix(self, group: dict[str, Any], p: torch.Tensor) -> bool:
        return bool(group["use_muon"])

    def matrix_input(
        self, p: torch.Tensor, grad: torch.Tensor, state: MutableMapping[str, Any], group: dict[str, Any]
    ) -> torch.Tensor:
        """The momentum step, and what Newton–Schulz orthogonalizes (Nesterov's blend, or the momentum)."""
        if torch.is_complex(p):
            raise RuntimeError("Muon does not support complex parameters")
        if grad.is_sparse:
            raise RuntimeError("Muon does not support sparse gradients")
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        buffer = state["momentum_buffer"]
        buffer.lerp_(grad, 1 - group["momentum"])
        return grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer

    def matrix_update(
        self, p: torch.Tensor, matrix: torch.Tensor, state: MutableMapping[str, Any], group: dict[str, Any]
    ) -> torch.Tensor:
        """Newton–Schulz of the whole matrix, read as ``(fan_out, fan_in)``; its lr factor goes to ``apply_update``."""
        x = matrix.T.contiguous() if group["transposed"] else matrix
        fan_out, fan_in = x.shape
        update = newton_schulz(x, group["ns_coefficients"], group["ns_steps"], group["ns_eps"], group["ns_dtype"])
        state["lr_scale"] = lr_scale(group["adjust_lr"], fan_out, fan_in)  # a number, gone after apply_update
        return update.T if group["transposed"] else update

    def apply_update(
        self, p: torch.Tensor, update: torch.Tensor, state: MutableMapping[str, Any], group: dict[str, Any]
    ) -> None:
        """Decoupled weight decay with the unscaled rate, then the step at the matrix's rate (torch's order)."""
        lr = group["lr"]
        p.mul_(1 - lr * group["weight_decay"])
        p.add_(update, alpha=-(lr * state.pop("lr_scale")))

    # ---- AdamW ----
    def step_elementwise(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """torch's AdamW on ``params`` of an AdamW ``group`` (this optimizer's group dict and state)."""
        assert self._adamw is not None, "a Muon group has a parameter that is not a matrix"
        self._adamw.state = self.state  # load_state_dict replaces the state dict and the group dicts
        self._adamw.param_groups = [group if len(params) == len(group["params"]) else {**group, "params": params}]
        self._adamw_lr_used = float(group["lr"])
        self._adamw.step()

    # ---- the step, and the first step's check ----
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step (:meth:`optiplug.MatrixOptimizer.step`); after the first, Newton–Schulz's count is confirmed."""
        calls = engagement.tally.calls
        self._adamw_lr_used = None
        loss = super().step(closure)
        if not self._confirmed and self.last_step_matrices:
            self._confirmed = True
            self._confirm(engagement.tally.calls - calls)
        return loss

    def _confirm(self, done: int) -> None:
        """Each process orthogonalizes every matrix it holds whole; a sharded one once per shard group."""
        sharded = [
            p
            for group in self.param_groups
            if group["use_muon"]
            for p in group["params"]
            if p.grad is not None and _is_dtensor(p)
        ]
        routed = len(self.routing.muon) if self.routing is not None else self.last_step_matrices
        if not sharded:
            engine = "DDP" if torch.distributed.is_available() and torch.distributed.is_initialized() else "one process"
            engagement.confirm(done, self.last_step_matrices, routed, engine)
            return
        first: Any = sharded[0]
        shard_dim = next(i for i, placement in enumerate(first.placements) if placement.is_shard())
        lead = first.device_mesh.get_local_rank(shard_dim) == 0  # counts the sharded matrices of its shard group
        expected = self.last_step_matrices - len(sharded) + (len(sharded) if lead else 0)
        engagement.confirm(done, expected, routed, "FSDP2", collective=True, device=first.to_local().device)

    # ---- checkpoints ----
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's, after turning 0.1.0's transposed Conv1D momentum to the parameter's layout; labels kept."""
        roles = [group.get(optiplug.GROUP_ROLE) for group in self.param_groups]
        groups = []
        state = dict(state_dict["state"])
        for group in state_dict["param_groups"]:
            if group.get("use_muon") and MOMENTUM_LAYOUT not in group:
                if group.get("transposed"):
                    for index in group["params"]:
                        if "momentum_buffer" in state.get(index, {}):
                            buffer = state[index]["momentum_buffer"]
                            state[index] = {**state[index], "momentum_buffer": buffer.T.contiguous()}
                group = {**group, MOMENTUM_LAYOUT: "parameter", "ns_dtype": group.get("ns_dtype", "bfloat16")}
            groups.append(group)
        super().load_state_dict({**state_dict, "state": state, "param_groups": groups})
        for group, role in zip(self.param_groups, roles):
            if role is not None:
                group.setdefault(optiplug.GROUP_ROLE, role)

    def log_values(self) -> dict[str, float]:
        """AdamW's learning rate in the last step, for the Trainer's log (its ``learning_rate`` is Muon's, also
        the rate of the step just taken, read before the scheduler moves on)."""
        if self._adamw is None:
            return {}
        used = getattr(self, "_adamw_lr_used", None)
        if used is None:
            used = next(float(g["lr"]) for g in self.param_groups if not g["use_muon"])
        return {"adamw_learning_rate": used}
