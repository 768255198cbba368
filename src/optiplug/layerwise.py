"""Layerwise stepping: each parameter is stepped in its post-accumulate-grad hook, and its gradient freed at once.

``optimizer.layerwise: true`` selects it for any optimizer whose entry declares ``per_parameter=True``
(its update of one parameter reads only that parameter's gradient and state). A step then never holds
every gradient at once: the gradient buffer, as large as the weights, disappears from the peak.

The optimizer stays one ordinary optimizer (not a dummy wrapper around one optimizer per parameter,
as transformers' ``LayerWiseDummyOptimizer``):

- its ``param_groups`` are the groups each hook reads its learning rate from, so any scheduler built on
  it (the Trainer builds it on the raw optimizer) drives every parameter;
- its ``state_dict()`` holds every parameter's state, saved and restored exactly (``weights_only``);
- its ``step()`` is a no-op: the hooks stepped every parameter during backward.

How one parameter is stepped: with the optimizer's own ``step_parameters(group, params)`` when it has
one (GaLore's optimizers do), otherwise by its ``step()`` with ``param_groups`` narrowed to the
parameter's group holding only that parameter (every ``torch.optim`` optimizer works this way).

- Gradient accumulation: a hook steps only at the accumulation boundary, as told by ``should_sync()``
  (inside a Trainer, ``accelerator.sync_gradients``) or, without one, by counting backward passes. Until
  then the gradient accumulates in ``.grad`` as usual.
- Clipping: a global norm needs every gradient at once, which is what layerwise stepping avoids holding;
  so each parameter's gradient is clipped to ``max_grad_norm`` on its own (a parameter whose gradient
  norm is below it is not changed).
- The logged gradient norm is the true global norm before clipping, assembled from the per-parameter
  norms (:meth:`LayerwiseStepper.grad_norm`; the Trainer's clipping call returns it, see :func:`patches`).
- Inside an OptiTrainer the hooks step only during ``train()``; an optimizer built without layerwise on the
  same parameters takes their hooks over (:func:`release_parameters`). The Trainer's side (its clipping
  call returns the norm the hooks saw) is a patch the trainer applies (``optiplug.trainer``).
- A model spread over several devices (``device_map``): autograd runs the hooks of each device on that
  device's own thread, so one lock serialises the hooks' stepping and bookkeeping, and the squared
  norms are summed per device and added up on one device only when the norm is read.
- Refused under DDP, DeepSpeed and FSDP (a hook would step before the gradient is reduced across
  processes, and FSDP2's sharded matrix step is a collective no single hook can run) and in fp16 (its
  loss scaling unscales gradients only after backward).

This module imports torch only inside functions: importing optiplug must not import torch.
"""

from __future__ import annotations

import functools
import threading
import types
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from optiplug.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from optiplug.context import BuildContext
    from optiplug.entries import OptimizerEntry

__all__ = [
    "LayerwiseStepper",
    "check_layerwise",
    "disable_layerwise",
    "enable_layerwise",
    "layerwise_stepper",
    "owner_of",
    "release_parameters",
]

# parameter -> (hook handle, weakref to its stepper); torch's dictionary compares tensor keys by identity
_HOOKS: Any = None
_ATTRIBUTE = "_optiplug_layerwise"  # the optimizer's stepper (a cycle the garbage collector frees with both)

_SHARDING = {
    "ddp": "DDP has averaged its gradient",
    "deepspeed": "DeepSpeed has reduced and partitioned its gradient",
    "fsdp": "FSDP has reduce-scattered its gradient",
}


def _hooks() -> Any:
    global _HOOKS
    if _HOOKS is None:
        from torch.utils.weak import WeakTensorKeyDictionary

        _HOOKS = WeakTensorKeyDictionary()
    return _HOOKS


def check_layerwise(entry: OptimizerEntry, ctx: BuildContext, cfg: Any) -> None:
    """Refuse ``layerwise: true`` where it cannot train, with one sentence (nothing to check otherwise).

    Raises:
        ConfigError: the entry is not per-parameter-safe, the run is distributed, or it trains in fp16.
    """
    if not getattr(cfg, "layerwise", False):
        return
    name = cfg.name
    if not entry.per_parameter:
        raise ConfigError(
            f"{name} with layerwise: true is not possible: its entry does not declare per_parameter=True (one "
            f"parameter's update may depend on the others); set layerwise: false"
        )
    engine = ctx.distributed
    if engine != "none":
        raise ConfigError(
            f"{name} with layerwise: true steps each parameter during backward, before "
            f"{_SHARDING.get(engine, 'the engine has reduced its gradient')} across the {ctx.world_size} processes; "
            f"set layerwise: false for distributed training"
        )
    if getattr(ctx.args, "fp16", False):
        raise ConfigError(
            f"{name} with layerwise: true cannot train in fp16, whose loss scaling unscales gradients only after "
            f"backward; use bf16 or set layerwise: false"
        )


def _stepped_in_backward(self: Any, closure: Callable[[], Any] | None = None) -> Any:
    """The optimizer's ``step()`` in layerwise mode: the hooks stepped every parameter during backward."""
    stepper = self.__dict__.get(_ATTRIBUTE)
    if stepper is not None:
        stepper.end_round()
    if closure is None:
        return None
    import torch

    with torch.enable_grad():
        return closure()


def _on_grad_ready(stepper_ref: weakref.ref, param: torch.Tensor) -> None:
    stepper = stepper_ref()
    if stepper is not None and stepper.active:
        stepper.on_grad_ready(param)


class LayerwiseStepper:
    """Steps each parameter of one optimizer in the parameter's post-accumulate-grad hook.

    Build it with :func:`enable_layerwise`; find it with :func:`layerwise_stepper`.
    """

    def __init__(
        self,
        optimizer: Any,
        *,
        accumulation_steps: int = 1,
        should_sync: Callable[[], bool] | None = None,
        max_grad_norm: float | None = None,
    ):
        self.optimizer = optimizer
        self.accumulation_steps = max(1, int(accumulation_steps))
        self.should_sync = should_sync
        self.max_grad_norm = max_grad_norm or None
        self.active = True
        self._lock = threading.Lock()  # hooks of a model on several devices run on one thread per device
        self._backward_passes: dict[torch.Tensor, int] = {}
        # The parameters stepped in this round (one optimizer step) and the sums of their squared norms, one per
        # device. A round ends when step() is called (the Trainer calls it after reading the norm) or a
        # parameter steps again.
        self._round: set[int] = set()
        self._round_ended = False
        self._norm_squares: dict[torch.device, torch.Tensor] = {}
        self._groups: dict[torch.Tensor, int] = {}
        self._per_parameter = callable(getattr(optimizer, "step_parameters", None))
        self._step = optimizer.step  # the real step, for optimizers without step_parameters
        optimizer.step = types.MethodType(_stepped_in_backward, optimizer)

    def parameters(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _group_index(self, p: torch.Tensor) -> int:
        # Indices, not group dicts: load_state_dict replaces the dicts (the parameters stay in place).
        if p not in self._groups:  # first use, or a group added with add_param_group
            self._groups = {q: i for i, group in enumerate(self.optimizer.param_groups) for q in group["params"]}
        return self._groups[p]

    def on_grad_ready(self, p: torch.Tensor) -> None:
        """The hook's work: at the accumulation boundary, clip, step and free ``p``'s gradient."""
        import torch

        with self._lock:
            if self.should_sync is not None:
                boundary = bool(self.should_sync())
            else:
                self._backward_passes[p] = self._backward_passes.get(p, 0) + 1
                boundary = self._backward_passes[p] % self.accumulation_steps == 0
            if not boundary or p.grad is None:
                return
            if self.max_grad_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm)
            else:  # clip_grad_norm_'s norm of one tensor (torch.nn.utils.get_total_norm needs torch 2.6)
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.detach(), 2.0)]), 2.0)
            square = norm.detach().float().square()
            if self._round_ended or id(p) in self._round:
                self._round, self._round_ended, self._norm_squares = set(), False, {}
            previous = self._norm_squares.get(square.device)
            self._norm_squares[square.device] = square if previous is None else previous + square
            self._round.add(id(p))
            self.step_parameter(p)
            p.grad = None

    def step_parameter(self, p: torch.Tensor) -> None:
        """Update ``p`` (which has a gradient) by one step of the optimizer, with its group's settings."""
        import torch

        optimizer = self.optimizer
        gindex = self._group_index(p)
        if self._per_parameter:
            with torch.no_grad():
                optimizer.step_parameters(optimizer.param_groups[gindex], [p])
            return
        groups = optimizer.param_groups
        group = groups[gindex]
        params = group["params"]
        optimizer.param_groups = [group]
        group["params"] = [p]
        try:
            self._step()
        finally:
            group["params"] = params
            optimizer.param_groups = groups

    def end_round(self) -> None:
        """The optimizer step is over: the next parameter stepped starts the next global norm."""
        self._round_ended = True

    def grad_norm(self) -> torch.Tensor:
        """The global L2 norm, before clipping, of the gradients of the latest layerwise step.

        On the device of the first parameter stepped (a model on several devices adds each device's part there).
        """
        import torch

        with self._lock:
            squares = list(self._norm_squares.values())
        if not squares:
            return torch.tensor(0.0)
        total = squares[0]
        for square in squares[1:]:
            total = total + square.to(total.device)
        return total.sqrt()

    def attach(self) -> None:
        hooks = _hooks()
        ref = weakref.ref(self)
        for p in self.parameters():
            previous = hooks.pop(p, None)
            if previous is not None:  # another optimizer built on this model before: only one may step it
                previous[0].remove()
            hooks[p] = (p.register_post_accumulate_grad_hook(functools.partial(_on_grad_ready, ref)), ref)
        self.optimizer.__dict__[_ATTRIBUTE] = self

    def detach(self) -> None:
        """Remove the hooks and give the optimizer its own ``step()`` back."""
        hooks = _hooks()
        for p in self.parameters():
            entry = hooks.get(p)
            if entry is not None and entry[1]() is self:
                entry[0].remove()
                del hooks[p]
        self.active = False
        self.optimizer.__dict__.pop("step", None)
        self.optimizer.__dict__.pop(_ATTRIBUTE, None)


def enable_layerwise(
    optimizer: Any,
    ctx: BuildContext | None = None,
    *,
    accumulation_steps: int | None = None,
    should_sync: Callable[[], bool] | None = None,
    max_grad_norm: float | None = None,
) -> LayerwiseStepper:
    """Step each parameter of ``optimizer`` in its post-accumulate-grad hook from now on.

    The core calls it on what an entry's ``build`` returned when the config says ``layerwise: true``
    (the entry must declare ``per_parameter=True``). Enabling it twice returns the stepper already there.

    Args:
        optimizer: the optimizer (a ``torch.optim.Optimizer``), per-parameter-safe.
        ctx: the build context: inside a Trainer the accumulation boundary is ``accelerator.sync_gradients``,
            and the accumulation steps and clipping norm come from its arguments.
        accumulation_steps: backward passes per optimizer step, counted per parameter when there is no
            ``should_sync`` (default: the context's, else 1).
        should_sync: called in each hook; True at the accumulation boundary.
        max_grad_norm: clip each parameter's gradient to this norm before its step (default: the context's;
            None or 0: no clipping).
    """
    from optiplug.unwrap import unwrap_optimizer

    optimizer = unwrap_optimizer(optimizer)
    existing = layerwise_stepper(optimizer)
    if existing is not None:
        return existing
    if should_sync is None and ctx is not None:
        accelerator = getattr(ctx.trainer, "accelerator", None)
        if accelerator is not None:
            accelerator_ref = weakref.ref(accelerator)

            def should_sync() -> bool:
                acc = accelerator_ref()
                return True if acc is None else bool(acc.sync_gradients)

    if accumulation_steps is None:
        accumulation_steps = ctx.gradient_accumulation_steps if ctx is not None else 1
    if max_grad_norm is None and ctx is not None:
        max_grad_norm = ctx.max_grad_norm
    stepper = LayerwiseStepper(
        optimizer, accumulation_steps=accumulation_steps, should_sync=should_sync, max_grad_norm=max_grad_norm
    )
    stepper.attach()
    return stepper


def layerwise_stepper(optimizer: Any) -> LayerwiseStepper | None:
    """The stepper of a layerwise optimizer (accelerate's wrapper is looked through), or None."""
    from optiplug.unwrap import unwrap_optimizer

    if optimizer is None:
        return None
    return getattr(unwrap_optimizer(optimizer), "__dict__", {}).get(_ATTRIBUTE)


def disable_layerwise(optimizer: Any) -> None:
    """Remove the hooks: ``step()`` steps every parameter again (nothing happens if it was not layerwise)."""
    stepper = layerwise_stepper(optimizer)
    if stepper is not None:
        stepper.detach()


def release_parameters(optimizer: Any) -> None:
    """Stop every other optimizer's layerwise hooks on ``optimizer``'s parameters: it has taken them over.

    The core calls it on every optimizer built without ``layerwise: true``, so a layerwise optimizer
    built earlier on the same model (and not yet garbage-collected) never steps them again.
    """
    from optiplug.unwrap import unwrap_optimizer

    if _HOOKS is None:
        return
    optimizer = unwrap_optimizer(optimizer)
    for group in getattr(optimizer, "param_groups", ()):
        for p in group["params"]:
            entry = _HOOKS.get(p)
            if entry is None:
                continue
            stepper = entry[1]()
            if stepper is None or stepper.optimizer is not optimizer:
                entry[0].remove()
                del _HOOKS[p]


def owner_of(params: Iterable[torch.Tensor]) -> LayerwiseStepper | None:
    """The active stepper stepping any of ``params`` in its hooks, or None."""
    if _HOOKS is None:
        return None
    for p in params:
        entry = _HOOKS.get(p)
        if entry is not None:
            stepper = entry[1]()
            if stepper is not None and stepper.active:
                return stepper
    return None
