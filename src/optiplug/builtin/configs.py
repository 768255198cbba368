"""The default plugin's config classes: torch.optim's optimizers, transformers' schedulers and Adafactor.

Their entries (``optimizers.py``, ``schedulers.py``, ``transformers.py``) name them with
:meth:`optiplug.LazyConfig.from_module`, so this module is imported when a config is first read (parsing a run
config, ``optiplug show``, ``schema``), not by ``optiplug list``: building some twenty pydantic classes is start-up
time. Each of those modules still gives its classes by their old names (``from optiplug.builtin.optimizers import
AdamWConfig``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from optiplug.configs import OptimizerConfig, SchedulerConfig
from optiplug.context import ScheduleContext
from optiplug.errors import ConfigError
from optiplug.fields import AdamFields, LearningRate
from optiplug.kernel import Kernel

# ---- torch.optim's optimizers (optimizers.py) ----------------------------------------------------

_KERNEL_HELP = "Kernel: 'fused' (one kernel), 'foreach' (batched), 'for-loop', or 'auto' (fused where supported)."


class _KernelChoice(OptimizerConfig):
    """A config whose ``kernel`` field picks torch's kernel; a config written up to 0.1 (a YAML file, a
    checkpoint's ``optiplug_config.json``) names that field ``implementation``, read as ``kernel``."""

    @model_validator(mode="before")
    @classmethod
    def _implementation_is_kernel(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "implementation" not in data:
            return data
        data = dict(data)
        old = data.pop("implementation")
        if data.setdefault("kernel", old) != old:
            raise ValueError(
                f"implementation is the old name of kernel: set kernel only (got both, {old!r} and {data['kernel']!r})"
            )
        return data


class AdamWConfig(AdamFields, _KernelChoice):
    """AdamW (decoupled weight decay), torch.optim.AdamW."""

    name: Literal["adamw"] = "adamw"
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (not on biases and norms).")
    amsgrad: bool = False
    kernel: Kernel = Field("auto", description=_KERNEL_HELP)


class AdamConfig(AdamFields, _KernelChoice):
    """Adam (L2 weight decay added to the gradient), torch.optim.Adam."""

    name: Literal["adam"] = "adam"
    amsgrad: bool = False
    kernel: Kernel = Field("auto", description=_KERNEL_HELP)


class SGDConfig(OptimizerConfig):
    """Stochastic gradient descent with optional (Nesterov) momentum, torch.optim.SGD."""

    name: Literal["sgd"] = "sgd"
    lr: LearningRate = 1e-2
    momentum: float = Field(0.9, ge=0, lt=1, description="Momentum factor (0 keeps no optimizer state).")
    dampening: float = Field(0.0, ge=0, le=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0, description="L2 penalty (not on biases and norms).")

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self):
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening 0")
        return self


class AdagradConfig(OptimizerConfig):
    """Adagrad, torch.optim.Adagrad."""

    name: Literal["adagrad"] = "adagrad"
    lr: LearningRate = 1e-2
    lr_decay: float = Field(0.0, ge=0)
    initial_accumulator_value: float = Field(0.0, ge=0)
    eps: float = Field(1e-10, gt=0)
    weight_decay: float = Field(0.0, ge=0)


class RMSpropConfig(OptimizerConfig):
    """RMSprop, torch.optim.RMSprop."""

    name: Literal["rmsprop"] = "rmsprop"
    lr: LearningRate = 1e-3
    alpha: float = Field(0.99, gt=0, lt=1, description="Smoothing constant of the squared-gradient average.")
    eps: float = Field(1e-8, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    centered: bool = False
    weight_decay: float = Field(0.0, ge=0)


class RAdamConfig(AdamFields):
    """Rectified Adam, torch.optim.RAdam."""

    name: Literal["radam"] = "radam"
    decoupled_weight_decay: bool = False


class NAdamConfig(AdamFields):
    """Adam with Nesterov momentum, torch.optim.NAdam."""

    name: Literal["nadam"] = "nadam"
    lr: LearningRate = 2e-3
    momentum_decay: float = Field(4e-3, ge=0)
    decoupled_weight_decay: bool = False


class AdamaxConfig(AdamFields):
    """Adamax (Adam with the infinity norm), torch.optim.Adamax."""

    name: Literal["adamax"] = "adamax"
    lr: LearningRate = 2e-3


# ---- transformers' learning-rate schedulers (schedulers.py) --------------------------------------


class _Warmup(SchedulerConfig):
    warmup_steps: int = Field(0, ge=0, description="Linear warmup over this many optimizer steps.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Linear warmup over this fraction of the training steps.")

    @model_validator(mode="after")
    def _one_warmup(self):
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("set warmup_steps or warmup_ratio, not both")
        return self

    def warmup(self, ctx: ScheduleContext) -> int:
        return ctx.warmup_steps(self.warmup_steps, self.warmup_ratio)

    def check(self, ctx: ScheduleContext) -> None:
        """Refuse a warmup not shorter than the run (the entry's ``check``, for every schedule with a warmup)."""
        ctx.check_warmup(self.name, self.warmup_steps, self.warmup_ratio)

    def after_warmup(self, steps: int) -> str:
        """What the rate does over the ``steps`` after warmup, in a few words (the run header)."""
        return f"{self.name} for {steps} steps"


class LinearConfig(_Warmup):
    """Linear decay to 0 after warmup."""

    name: Literal["linear"] = "linear"

    def after_warmup(self, steps: int) -> str:
        return f"linear decay to 0 over {steps} steps"


class CosineConfig(_Warmup):
    """Cosine decay to 0 after warmup."""

    name: Literal["cosine"] = "cosine"
    num_cycles: float = Field(0.5, gt=0, description="Number of cosine waves (0.5: from the peak down to 0).")

    def after_warmup(self, steps: int) -> str:
        cycles = "" if self.num_cycles == 0.5 else f" ({self.num_cycles:g} cycles)"
        return f"cosine decay{cycles} to 0 over {steps} steps"


class CosineWithRestartsConfig(_Warmup):
    """Cosine decay with hard restarts."""

    name: Literal["cosine_with_restarts"] = "cosine_with_restarts"
    num_cycles: int = Field(1, ge=1, description="Number of hard restarts.")

    def after_warmup(self, steps: int) -> str:
        return f"cosine decay with {self.num_cycles} hard restart(s) over {steps} steps"


class PolynomialConfig(_Warmup):
    """Polynomial decay to ``lr_end``."""

    name: Literal["polynomial"] = "polynomial"
    lr_end: float = Field(1e-7, ge=0, description="Final learning rate.")
    power: float = Field(1.0, gt=0, description="Power of the polynomial.")

    def after_warmup(self, steps: int) -> str:
        return f"polynomial (power {self.power:g}) decay to {self.lr_end:g} over {steps} steps"


class ConstantConfig(SchedulerConfig):
    """Constant learning rate."""

    name: Literal["constant"] = "constant"


class ConstantWithWarmupConfig(_Warmup):
    """Constant learning rate after a linear warmup."""

    name: Literal["constant_with_warmup"] = "constant_with_warmup"

    def after_warmup(self, steps: int) -> str:
        return f"constant for {steps} steps"


class InverseSqrtConfig(_Warmup):
    """Inverse square-root decay after warmup."""

    name: Literal["inverse_sqrt"] = "inverse_sqrt"
    timescale: int | None = Field(None, gt=0, description="Time scale of the decay (default: the warmup steps).")

    def after_warmup(self, steps: int) -> str:
        return f"inverse square-root decay for {steps} steps"


class CosineWithMinLrConfig(_Warmup):
    """Cosine decay to a floor (``min_lr`` or ``min_lr_rate`` x the peak)."""

    name: Literal["cosine_with_min_lr"] = "cosine_with_min_lr"
    num_cycles: float = Field(0.5, gt=0)
    min_lr: float | None = Field(None, ge=0, description="Floor learning rate.")
    min_lr_rate: float | None = Field(0.1, ge=0, le=1, description="Floor as a fraction of the peak.")

    @model_validator(mode="after")
    def _one_floor(self):
        if self.min_lr is not None and "min_lr_rate" in self.model_fields_set:
            raise ValueError("set min_lr or min_lr_rate, not both")
        return self

    def after_warmup(self, steps: int) -> str:
        floor = f"{self.min_lr:g}" if self.min_lr is not None else f"{self.min_lr_rate:g} x lr"
        return f"cosine decay to {floor} over {steps} steps"


class CosineWarmupWithMinLrConfig(CosineWithMinLrConfig):
    """Cosine decay to a floor after a warmup that starts at ``warmup_lr_rate`` x the peak (not at 0)."""

    name: Literal["cosine_warmup_with_min_lr"] = "cosine_warmup_with_min_lr"  # type: ignore[assignment]
    warmup_lr_rate: float | None = Field(
        None, ge=0, le=1, description="Where warmup starts, as a fraction of the peak (default: 1 / warmup steps)."
    )


class GreedyConfig(SchedulerConfig):
    """GreedyLR (transformers): raise the rate while the evaluation metric improves, lower it while it does not.

    Like ``reduce_lr_on_plateau`` it steps on the evaluation metric, so the run needs evaluation.
    """

    name: Literal["greedy"] = "greedy"
    mode: Literal["min", "max"] = "min"
    factor: float = Field(0.95, gt=0, lt=1, description="Multiply (or divide) the rate by this.")
    patience: int = Field(10, ge=0)
    threshold: float = Field(1e-6, ge=0)
    threshold_mode: Literal["rel", "abs"] = "abs"
    cooldown: int = Field(0, ge=0)
    warmup: int = Field(0, ge=0, description="Evaluations during which the rate only increases.")
    min_lr: float = Field(1e-3, ge=0)
    max_lr: float = Field(1.0, gt=0)
    eps: float = Field(1e-8, ge=0)
    smooth: bool = Field(False, description="Smooth the metric over window_size evaluations.")
    window_size: int = Field(50, ge=1)
    reset_start: int = Field(500, ge=0)


class WarmupStableDecayConfig(_Warmup):
    """Warmup, a stable phase, then decay (WSD).

    The lengths come from the run's total steps unless given: decay ``decay_steps`` (default
    ``ceil(decay_ratio x total)``, 10%), stable what is left after warmup and decay (or
    ``stable_steps``; steps after warmup + stable + decay stay at the floor).
    """

    name: Literal["warmup_stable_decay"] = "warmup_stable_decay"
    decay_ratio: float = Field(0.1, gt=0, le=1, description="Fraction of the training steps spent decaying.")
    decay_steps: int | None = Field(None, ge=1, description="Decay steps (instead of decay_ratio).")
    stable_steps: int | None = Field(
        None, ge=0, description="Stable steps (default: the total minus warmup and decay)."
    )
    warmup_type: Literal["linear", "cosine", "1-sqrt"] = "linear"
    decay_type: Literal["linear", "cosine", "1-sqrt"] = "cosine"
    min_lr_ratio: float = Field(
        0.0, ge=0, le=1, description="Floor as a fraction of the peak: where warmup starts and decay ends."
    )
    num_cycles: float = Field(0.5, gt=0)

    @model_validator(mode="after")
    def _one_decay_length(self):
        if self.decay_steps is not None and "decay_ratio" in self.model_fields_set:
            raise ValueError("set decay_steps or decay_ratio, not both")
        return self

    def check(self, ctx: ScheduleContext) -> None:
        self.lengths(ctx)  # warmup and decay fit in the run; with stable_steps given, the warmup alone must
        super().check(ctx)

    def lengths(self, ctx: ScheduleContext) -> tuple[int, int, int]:
        """``(warmup, stable, decay)`` steps for this run."""
        import math

        warmup = self.warmup(ctx)
        if self.decay_steps is not None:
            decay = self.decay_steps
        else:
            decay = math.ceil(self.decay_ratio * ctx.num_training_steps)
        stable = self.stable_steps if self.stable_steps is not None else ctx.num_training_steps - warmup - decay
        if stable < 0:
            raise ConfigError(
                f"scheduler 'warmup_stable_decay': warmup ({warmup}) and decay ({decay}) steps exceed the run's "
                f"{ctx.num_training_steps} steps: shorten them or train longer"
            )
        return warmup, stable, decay


class ReduceLROnPlateauConfig(SchedulerConfig):
    """Reduce the learning rate when the evaluation metric stops improving (needs evaluation)."""

    name: Literal["reduce_lr_on_plateau"] = "reduce_lr_on_plateau"
    mode: Literal["min", "max"] = "min"
    factor: float = Field(0.1, gt=0, lt=1)
    patience: int = Field(10, ge=0)
    threshold: float = Field(1e-4, ge=0)
    min_lr: float = Field(0.0, ge=0)


# ---- transformers' Adafactor and its schedule (transformers.py) ----------------------------------


class AdafactorConfig(OptimizerConfig):
    """Adafactor (factored second moments), transformers.optimization.Adafactor."""

    name: Literal["adafactor"] = "adafactor"
    lr: float | None = Field(1e-3, gt=0, description="External learning rate; null with relative_step.")
    eps: tuple[float, float] = Field((1e-30, 1e-3), description="Regularizers of the squared gradient and the scale.")
    clip_threshold: float = Field(1.0, gt=0, description="Threshold of the root-mean-square of the final update.")
    decay_rate: float = Field(-0.8, lt=0, description="Exponent of the running average of the squared gradient.")
    beta1: float | None = Field(None, ge=0, lt=1, description="First-moment coefficient (None: no first moment).")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay (not on biases and norms).")
    scale_parameter: bool = Field(False, description="Scale the rate by the parameter's root-mean-square.")
    relative_step: bool = Field(False, description="Compute a time-dependent rate instead of using lr.")
    warmup_init: bool = Field(False, description="With relative_step, warm the rate up from 1e-6.")

    @model_validator(mode="after")
    def _one_rate(self):
        if self.relative_step and self.lr is not None:
            raise ValueError("relative_step computes the learning rate: set lr to null and the scheduler to adafactor")
        if not self.relative_step and self.lr is None:
            raise ValueError("lr is required unless relative_step is true")
        if self.warmup_init and not self.relative_step:
            raise ValueError("warmup_init needs relative_step: true")
        return self


class AdafactorScheduleConfig(SchedulerConfig):
    """Reports the rate Adafactor computes with ``relative_step: true`` (transformers' AdafactorSchedule)."""

    name: Literal["adafactor"] = "adafactor"
    initial_lr: float = Field(0.0, ge=0, description="The rate reported before the first step.")
