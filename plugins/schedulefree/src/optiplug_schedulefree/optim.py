"""schedulefree's optimizers with an exact train/eval switch and a state that resumes exactly.

Schedule-free keeps two points per parameter: the model holds y (where gradients are taken)
in train mode, and the state holds z (the SGD/Adam iterate). The weights to evaluate and save
are x, with ``y = beta * x + (1 - beta) * z``. Upstream's ``eval()`` turns y into x in place and
``train()`` turns x back into y in place; in floating point the round trip does not give y back,
so every evaluation or save would change the training run. Here ``eval()`` keeps y aside (one
copy of the trained parameters, only while in eval mode) and ``train()`` puts that copy back,
so any number of evaluations and saves leave training bit for bit as it was.

``state_dict()`` adds y to each parameter's state (``"y"``): a checkpoint's model weights are x,
and y cannot be recovered exactly from x and z. ``load_state_dict()`` keeps the loaded y aside and
leaves the optimizer in eval mode, so the next ``train()`` (the Trainer calls it before every
step) puts y into the model whatever weights were loaded into it.

Under DeepSpeed ZeRO the optimizer steps fp32 partitions, not the model's weights: the plugin's
callback gives it the engine's :class:`~optiplug_schedulefree.engines.EngineWeights` when training
starts, so a switch reaches the model's weights there too (see :mod:`optiplug_schedulefree.engines`).
A new optimizer starts in train mode: before its first step y, x and z are the same point, so only the
mode's name changes (torch's distributed checkpoint steps a fresh optimizer once, with lr 0, to create
its state before loading one, and upstream's step refuses to run in eval mode).
"""

from __future__ import annotations

from typing import Any

import torch
from schedulefree import AdamWScheduleFree, RAdamScheduleFree, SGDScheduleFree

import optiplug
from optiplug_schedulefree.engines import EngineWeights

__all__ = ["ExactAdamWScheduleFree", "ExactRAdamScheduleFree", "ExactSGDScheduleFree", "build_schedule_free"]


class ExactSwitch(torch.optim.Optimizer):
    """Mixin for a schedulefree optimizer: exact ``train()``/``eval()`` and a resumable ``state_dict()``."""

    _kept_y: dict[torch.Tensor, torch.Tensor]
    engine: EngineWeights = EngineWeights()
    """Where the switch must reach the model's weights; the plugin's callback sets it under DeepSpeed ZeRO."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for group in self.param_groups:
            group["train_mode"] = True  # no state yet: y = x = z, so the mode is only a name (see the module)

    def _beta(self, group: dict[str, Any]) -> float:
        """The interpolation weight of x in y (``beta1``, or SGD's ``momentum``)."""
        return float(group["betas"][0])

    @property
    def kept_y(self) -> dict[torch.Tensor, torch.Tensor]:
        """y of each parameter, kept aside while the model holds x (empty in train mode)."""
        if not hasattr(self, "_kept_y"):
            self._kept_y = {}
        return self._kept_y

    @property
    def in_train_mode(self) -> bool:
        """True when the model holds y (training), False when it holds x (evaluation, saving)."""
        return any(group["train_mode"] for group in self.param_groups)

    @torch.no_grad()
    def eval(self) -> None:
        """Set the parameters to x, keeping y aside so that :meth:`train` restores it exactly."""
        if not self.in_train_mode:
            return
        with self.engine.exposed():
            for group in self.param_groups:
                if group["train_mode"]:
                    for p in group["params"]:
                        if "z" in self.state[p]:
                            self.kept_y[p] = p.detach().clone()
            super().eval()  # type: ignore[misc]  # upstream's in-place y -> x (the mixin precedes its class)
        self.engine.push()

    @torch.no_grad()
    def train(self) -> None:
        """Set the parameters back to y: the copy :meth:`eval` (or :meth:`load_state_dict`) kept, bit for bit."""
        if all(group["train_mode"] for group in self.param_groups):
            return  # the Trainer calls this before every step: nothing to switch, nothing to push
        with self.engine.exposed():
            for group in self.param_groups:
                if group["train_mode"]:
                    continue
                weight = 1 - self._beta(group)
                for p in group["params"]:
                    kept = self.kept_y.pop(p, None)
                    if kept is not None:
                        p.copy_(kept)
                    elif "z" in self.state[p]:  # x with no y kept (an upstream checkpoint): upstream's switch
                        p.lerp_(end=self.state[p]["z"].to(p.device), weight=weight)
                group["train_mode"] = True
        self.engine.push()

    def step(self, closure: Any = None) -> Any:
        """Upstream's step, on the groups that hold parameters.

        Upstream advances every group's step count and average weights at each call, parameters or not.
        DeepSpeed ZeRO-3 steps the optimizer once per group, with only that group's fp32 partition in it
        and the others empty: without this, each group would count as many steps as there are groups.
        """
        groups = self.param_groups
        live = [group for group in groups if group["params"]]
        if len(live) == len(groups):
            return super().step(closure)  # upstream's step (the mixin precedes its class)
        self.param_groups = live
        try:
            return super().step(closure)
        finally:
            self.param_groups = groups

    def _y(self, p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        if group["train_mode"]:
            return p.detach()
        kept = self.kept_y.get(p)
        if kept is not None:
            return kept
        return torch.lerp(p.detach(), self.state[p]["z"].to(p.device), 1 - self._beta(group))

    def state_dict(self) -> dict[str, Any]:
        """torch's ``state_dict`` with y under ``"y"`` in the state of every parameter that has a z."""
        saved = super().state_dict()
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if "z" in self.state[p]:
                    saved["state"][index] = {**saved["state"][index], "y": self._y(p, group)}
                index += 1
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the state; a saved y is kept aside (eval mode) and goes into the model at the next :meth:`train`."""
        self.kept_y.clear()
        super().load_state_dict(state_dict)  # casts y like z: to each parameter's dtype and device
        for group in self.param_groups:
            found = False
            for p in group["params"]:
                y = self.state[p].pop("y", None)
                if y is not None:
                    self.kept_y[p] = y
                    found = True
            if found:
                group["train_mode"] = False

    def log_values(self) -> dict[str, float]:
        """The learning rate of the last step, warmup included (joins the Trainer's log records)."""
        return {"schedule_free_lr": float(self.param_groups[0].get("scheduled_lr", 0.0))}


class ExactAdamWScheduleFree(ExactSwitch, AdamWScheduleFree):
    """``schedulefree.AdamWScheduleFree`` with an exact train/eval switch and exact resume."""


class ExactRAdamScheduleFree(ExactSwitch, RAdamScheduleFree):
    """``schedulefree.RAdamScheduleFree`` with an exact train/eval switch and exact resume."""


class ExactSGDScheduleFree(ExactSwitch, SGDScheduleFree):
    """``schedulefree.SGDScheduleFree`` with an exact train/eval switch and exact resume."""

    def _beta(self, group: dict[str, Any]) -> float:
        return float(group["momentum"])


def schedule_free_optimizer(optimizer: Any) -> ExactSwitch | None:
    """The plugin's optimizer under accelerate's (and DeepSpeed's) wrapper, or None when ``optimizer`` is another."""
    found = optiplug.unwrap_optimizer(optimizer, until=lambda o: isinstance(o, ExactSwitch))
    return found if isinstance(found, ExactSwitch) else None


def build_schedule_free(ctx: optiplug.BuildContext, cfg: Any) -> ExactSwitch:
    """Build the optimizer ``cfg`` names on ``ctx``'s trainable parameters (decay / no-decay groups)."""
    groups = ctx.param_groups(cfg.weight_decay)
    common: dict[str, Any] = dict(
        lr=cfg.lr, weight_decay=cfg.weight_decay, r=cfg.r, weight_lr_power=cfg.weight_lr_power, foreach=cfg.foreach
    )
    # Keyword dicts: schedulefree has no type hints, so a type checker sees torch.optim.Optimizer's signature.
    extra: dict[str, Any]
    if cfg.name == "schedule_free_adamw":
        extra = dict(betas=cfg.betas, eps=cfg.eps, warmup_steps=cfg.warmup_steps)
        return ExactAdamWScheduleFree(groups, **common, **extra)
    if cfg.name == "schedule_free_radam":
        extra = dict(betas=cfg.betas, eps=cfg.eps, silent_sgd_phase=cfg.silent_sgd_phase)
        return ExactRAdamScheduleFree(groups, **common, **extra)
    if cfg.name == "schedule_free_sgd":
        extra = dict(momentum=cfg.momentum, warmup_steps=cfg.warmup_steps)
        return ExactSGDScheduleFree(groups, **common, **extra)
    raise ValueError(f"not a schedule-free optimizer: {cfg.name!r}")
