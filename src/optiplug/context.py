"""What a factory or a check sees: the model, the trainer and its arguments, the launch setup."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from optiplug import params

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import Trainer, TrainingArguments

    from optiplug.configs import ParamGroupRule, SchedulerConfig

__all__ = ["BuildContext", "ParamShape", "ScheduleContext"]


@dataclass(frozen=True)
class ParamShape:
    """A trainable parameter as ``state_bytes`` sees it: no tensor, just its description.

    Attributes:
        name: the parameter's qualified name (``model.layers.0.mlp.up_proj.weight``).
        shape: its shape.
        itemsize: bytes per element of the parameter's dtype.
        module_type: class name of the module owning it (``"Linear"``, ``"Embedding"``, ...).
    """

    name: str
    shape: tuple[int, ...]
    itemsize: int
    module_type: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @staticmethod
    def of_model(model: nn.Module) -> list[ParamShape]:
        """The trainable parameters of ``model`` (also on the ``meta`` device), in model order.

        A parameter partitioned by DeepSpeed ZeRO-3 (``deepspeed.zero.Init``) is a 1-D placeholder
        whose shape as a layer is its ``ds_shape``: that is the shape given.
        """
        owners = {}
        for module_name, module in model.named_modules():
            for param_name, _ in module.named_parameters(recurse=False):
                owners[f"{module_name}.{param_name}" if module_name else param_name] = type(module).__name__
        return [
            ParamShape(name, tuple(getattr(p, "ds_shape", None) or p.shape), p.element_size(), owners.get(name, ""))
            for name, p in model.named_parameters()
            if p.requires_grad
        ]


def _read_json(path: str) -> dict:
    import json

    from optiplug.errors import ConfigError

    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"cannot read the DeepSpeed config {path!r} (TrainingArguments.deepspeed; training.deepspeed in a run "
            f"config): {error}"
        ) from None


@dataclass
class BuildContext:
    """Passed to an entry's ``build(ctx, cfg)`` and ``check(ctx, cfg)``.

    Attributes:
        model: the model whose parameters the optimizer trains.
        trainer: the trainer, or None when building outside one (a plain PyTorch loop).
        args: the trainer's ``TrainingArguments``, or None.
        param_group_rules: the config's ``param_groups`` (set by the factory before ``build``);
            :meth:`param_groups` applies them.
        scheduler_config: the run's scheduler config when it is known (a trainer's, or the run's in
            ``optiplug validate``), else None; a check that depends on the schedule reads it here.
    """

    model: nn.Module
    trainer: Trainer | None = None
    args: TrainingArguments | None = None
    param_group_rules: tuple[ParamGroupRule, ...] = ()
    scheduler_config: SchedulerConfig | None = None
    _decay: set[str] | None = field(default=None, init=False, repr=False)
    _rule_of: dict[int, int | None] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.scheduler_config is None:  # an OptiTrainer's own
            self.scheduler_config = getattr(self.trainer, "scheduler_config", None)

    # ---- parameters ----
    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The trainable ``(name, parameter)`` pairs of the model."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def decay_parameter_names(self) -> set[str]:
        """Parameter names that get weight decay (not biases or norms), as transformers decides."""
        if self._decay is None:
            if self.trainer is not None and hasattr(self.trainer, "get_decay_parameter_names"):
                self._decay = set(self.trainer.get_decay_parameter_names(self.model))
            else:
                self._decay = params.decay_parameter_names(self.model)
        return self._decay

    def param_groups(self, weight_decay: float = 0.0, **options: Any) -> list[dict[str, Any]]:
        """Decay and no-decay groups of the trainable parameters; ``options`` go into every group.

        This is the contract that gives an optimizer ``optimizer.param_groups``: a factory that
        builds its optimizer from these groups (splitting them further if it must, never merging
        them) gets the user's groups by name, each with its options, for free. Without rules
        there are two groups: decay (``weight_decay``) and no-decay (0, biases and norms).
        """
        rules = tuple(self.param_group_rules)
        groups = params.param_groups(
            self.named_parameters(), self.decay_parameter_names(), weight_decay, rules, **options
        )
        index = {rule.label: i for i, rule in enumerate(rules)}
        self._rule_of = {
            id(param): index.get(group.get(params.GROUP_KEY, "")) for group in groups for param in group["params"]
        }
        return groups

    # ---- the training setup, for checks ----
    @property
    def gradient_accumulation_steps(self) -> int:
        return int(getattr(self.args, "gradient_accumulation_steps", 1) or 1)

    @property
    def max_grad_norm(self) -> float | None:
        """The clipping norm, or None when clipping is off."""
        value = getattr(self.args, "max_grad_norm", None)
        return float(value) if value else None

    @property
    def world_size(self) -> int:
        """Number of training processes (from the arguments, or the launcher's ``WORLD_SIZE``)."""
        if self.args is not None:
            return int(self.args.world_size)
        return int(os.environ.get("WORLD_SIZE", "1"))

    @property
    def deepspeed_config(self) -> dict[str, Any] | None:
        """The DeepSpeed config (``"auto"`` values filled in once transformers read it), or None without DeepSpeed."""
        ds = getattr(self.args, "deepspeed", None)
        if not ds:
            return None
        plugin = getattr(self.args, "hf_deepspeed_config", None)
        config = getattr(plugin, "config", None)
        if config is None:
            config = ds if isinstance(ds, dict) else _read_json(ds)
        return dict(config)

    @property
    def deepspeed_stage(self) -> int | None:
        """The DeepSpeed ZeRO stage, or None without DeepSpeed."""
        config = self.deepspeed_config
        if config is None:
            return None
        return int(config.get("zero_optimization", {}).get("stage", 0))

    @property
    def distributed(self) -> str:
        """``"none"``, ``"ddp"``, ``"deepspeed"`` or ``"fsdp"``: what the engine really runs.

        A model whose parameters are DTensors (``fully_shard``-ed) is FSDP, in a Trainer or not.
        Otherwise, inside a Trainer this is what accelerate enabled (on a machine without GPUs
        accelerate runs ``training.fsdp`` as plain DDP, so that reads ``"ddp"``); outside one, it is
        read from the arguments.
        """
        if any(type(p).__name__ == "DTensor" for _, p in self.named_parameters()):
            return "fsdp"
        trainer = self.trainer
        if trainer is not None and getattr(trainer, "accelerator", None) is not None:
            if getattr(trainer, "is_deepspeed_enabled", False):
                return "deepspeed"
            if getattr(trainer, "is_fsdp_enabled", False):
                return "fsdp"
            return "ddp" if self.world_size > 1 else "none"
        if getattr(self.args, "deepspeed", None):
            return "deepspeed"
        if getattr(self.args, "fsdp", None):
            return "fsdp"
        return "ddp" if self.world_size > 1 else "none"

    @property
    def device_type(self) -> str:
        """Where the parameters train (``"cpu"``, ``"cuda"``, ...): their device, or for a model without weights
        (torch's ``meta`` device, as ``optiplug validate`` builds it) the arguments' device."""
        device = next((p.device.type for _, p in self.named_parameters()), "cpu")
        if device == "meta":
            device = getattr(getattr(self.args, "device", None), "type", None) or "cpu"
        return device

    @property
    def uses_adapters(self) -> bool:
        """True when the model is a PEFT model (LoRA and similar)."""
        return hasattr(self.model, "peft_config")


@dataclass
class ScheduleContext:
    """Passed to a scheduler entry's ``build(ctx, cfg)``.

    Attributes:
        optimizer: the raw optimizer (never the accelerate wrapper).
        num_training_steps: the total number of optimizer steps.
    """

    optimizer: Any
    num_training_steps: int

    def warmup_steps(self, steps: int = 0, ratio: float = 0.0) -> int:
        """``steps`` when positive, else ``ceil(ratio * num_training_steps)``."""
        return int(steps) if steps and steps > 0 else math.ceil(float(ratio or 0.0) * self.num_training_steps)

    def check_warmup(self, scheduler: str, steps: int = 0, ratio: float = 0.0) -> None:
        """Raise :class:`ConfigError` when the warmup (:meth:`warmup_steps`) is not shorter than the run: the
        rate would never reach its peak. For an entry's ``check``; ``scheduler`` names it in the sentence."""
        from optiplug.errors import ConfigError

        warmup, total = self.warmup_steps(steps, ratio), self.num_training_steps
        if warmup >= total:
            given = f"warmup_steps={steps}" if steps and steps > 0 else f"warmup_ratio={ratio:g} ({warmup} steps)"
            raise ConfigError(
                f"scheduler {scheduler!r}: {given} is not shorter than the run's {total} steps, so the rate would "
                "never reach the optimizer's learning rate: shorten the warmup or train longer"
            )
