"""Build optimizers and schedulers from configs, with or without a Trainer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any

from optiplug.configs import OptimizerConfig, SchedulerConfig
from optiplug.context import BuildContext, ScheduleContext
from optiplug.entries import OptimizerEntry
from optiplug.errors import ConfigError, MissingDependencyError, OptiplugError, PluginError
from optiplug.layerwise import check_layerwise, enable_layerwise, release_parameters
from optiplug.matrices import check_built_for_fsdp2
from optiplug.offload import check_offload, offloaded
from optiplug.params import apply_group_rules
from optiplug.registry import get_entry, get_scheduler_entry, parse_optimizer, parse_scheduler
from optiplug.unwrap import unwrap_optimizer

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "build_from_entry",
    "build_optimizer",
    "build_scheduler",
    "check_before_training",
    "check_evaluated",
    "check_group_options",
    "check_optimizer",
    "check_param_groups",
    "steps_on_evaluation",
]


@contextlib.contextmanager
def _missing_modules_named(kind: str, name: str, requires: tuple[str, ...]) -> Iterator[None]:
    try:
        yield
    except ModuleNotFoundError as error:
        package = requires[0] if requires else (error.name or "").split(".")[0]
        raise MissingDependencyError(
            f"{kind} {name!r} needs the module {error.name!r}, which is not installed: pip install '{package}'"
        ) from error


def _plugin_of(kind: str, name: str) -> str:
    from optiplug.registry import registry

    try:
        return registry.lookup(kind, name).plugin
    except OptiplugError:
        return "(not registered)"


class _Raised(PluginError):
    """A plugin's ``check`` or ``build`` raised an exception that is not optiplug's (``what`` ran, ``cause`` is why).

    On a model without weights (torch's meta device) that may be the missing weights, not the config:
    :func:`check_before_training` lists such a check as left to the run instead of refusing.
    """

    def __init__(self, message: str, what: str, cause: str):
        super().__init__(message)
        self.what, self.cause = what, cause


def _called(kind: str, name: str, what: str, call: Any, *arguments: Any) -> Any:
    """``call(*arguments)``: a plugin's ``check`` or ``build``; an exception that is not optiplug's is named by the
    plugin and the entry (:class:`_Raised`)."""
    try:
        return call(*arguments)
    except (OptiplugError, ModuleNotFoundError):
        raise
    except Exception as error:
        cause = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
        verb = "build" if what == "build" else f"run its {what}"
        raise _Raised(
            f"{kind} {name!r} (plugin {_plugin_of(kind, name)!r}) failed to {verb}: {cause}", f"{name}'s {what}", cause
        ) from error


NO_TRAINABLE_PARAMETERS = (
    "the model has no trainable parameters (every parameter has requires_grad=False): unfreeze some "
    "(param.requires_grad_(True)) or add adapters; in a run config, check finetuning.trainable or "
    "finetuning.target_modules"
)


def require_trainable(ctx: BuildContext) -> None:
    """Raise :class:`ConfigError` when the model has no parameter to train (before an entry's check or build)."""
    if not ctx.named_parameters():
        raise ConfigError(NO_TRAINABLE_PARAMETERS)


class _StepsUnknown(ScheduleContext):
    """A ScheduleContext without a step count: a scheduler that reads it is told to pass one."""

    def __getattribute__(self, name: str) -> Any:
        if name == "num_training_steps":
            scheduler = object.__getattribute__(self, "scheduler_name")
            raise ConfigError(
                f"scheduler {scheduler!r} needs num_training_steps > 0: pass "
                f"build_scheduler(optimizer, {scheduler!r}, num_training_steps=TOTAL_STEPS)"
            )
        return super().__getattribute__(name)

    def warmup_steps(self, steps: int = 0, ratio: float = 0.0) -> int:
        return int(steps) if steps and steps > 0 else 0 if not ratio else super().warmup_steps(steps, ratio)


_ANNOTATED: Any = Annotated  # built at run time from a field (type checkers read Annotated[...] statically)


def check_group_options(cfg: OptimizerConfig) -> None:
    """Each ``optimizer.param_groups`` option that is also a field of ``cfg`` must be a valid value of that field.

    ``betas: [2.0, 0.9]`` in a group of an Adam is refused as ``optimizer.betas: [2.0, 0.9]`` would be; an option
    that is no field of the config is checked against the built optimizer (:func:`optiplug.params.apply_group_rules`).

    Raises:
        ConfigError: ``optimizer.param_groups[i].KEY: <what the field says>``.
    """
    from pydantic import ConfigDict, TypeAdapter, ValidationError

    from optiplug.configs import format_validation_error

    fields = type(cfg).model_fields
    for index, rule in enumerate(getattr(cfg, "param_groups", ())):
        for key, value in rule.options.items():
            field = fields.get(key)
            if field is None or key == "param_groups":
                continue
            annotation = _ANNOTATED[field.annotation, field]  # the field's type with its constraints
            try:
                TypeAdapter(annotation, config=ConfigDict(allow_inf_nan=False)).validate_python(value)
            except ValidationError as error:
                raise ConfigError(format_validation_error(error, f"optimizer.param_groups[{index}].{key}")) from None


def check_optimizer(entry: OptimizerEntry, ctx: BuildContext, cfg: OptimizerConfig) -> None:
    """The optimizer's checks, in one order, whichever way a run starts (the one check path).

    :func:`build_optimizer`, :func:`build_from_entry`, ``OptiTrainerMixin.check_optimizer`` and the app
    (``optiplug train``, ``--dry-run``, ``validate``, through :func:`check_before_training`) all run these:
    trainable parameters; the entry's ``requires``; per-group options against the config's fields; the
    entry's ``check``; the core's ``layerwise`` and ``offload`` rules; every ``param_groups`` pattern takes a
    parameter. A module the check imports that is missing is a :class:`MissingDependencyError`.

    Raises:
        ConfigError, MissingDependencyError, PluginError (the entry's check raised something else).
    """
    require_trainable(ctx)
    entry.check_requires()
    check_group_options(cfg)
    with _missing_modules_named("optimizer", entry.name, entry.requires):
        if entry.check is not None:
            _called("optimizer", entry.name, "check", entry.check, ctx, cfg)
        check_layerwise(entry, ctx, cfg)
        check_offload(entry, ctx, cfg)
        check_param_groups(ctx, cfg)


def _refused_field(entry: OptimizerEntry, ctx: BuildContext, cfg: OptimizerConfig) -> str | None:
    """The one field whose value the optimizer's constructor refuses: the build passes with it at its default."""
    fields = type(cfg).model_fields
    for key in sorted(cfg.model_fields_set - {"name", "param_groups"}):
        default = fields[key].get_default(call_default_factory=True)
        if getattr(cfg, key) == default:
            continue
        try:
            entry.build(ctx, cfg.model_copy(update={key: default}))
        except Exception:
            continue
        return key
    return None


def _built_optimizer(entry: OptimizerEntry, ctx: BuildContext, cfg: OptimizerConfig) -> Any:
    """The entry's factory on ``ctx``, then the core's checks of what it built (not made layerwise or offloaded).

    A constructor that refuses an argument (``ValueError``/``TypeError``) is reported on the config field it
    came from when resetting that one field lets the build pass: ``optimizer.betas: beta1 must be in ...``.
    """
    rules = tuple(getattr(cfg, "param_groups", ()))
    ctx.param_group_rules = rules
    with _missing_modules_named("optimizer", entry.name, entry.requires):
        try:
            optimizer = _called("optimizer", entry.name, "build", entry.build, ctx, cfg)
        except _Raised as error:
            original = error.__cause__
            key = _refused_field(entry, ctx, cfg) if isinstance(original, (ValueError, TypeError)) else None
            if key is None:
                raise
            refusal = (str(original).strip().splitlines() or [type(original).__name__])[0]
            raise ConfigError(f"optimizer.{key}: {refusal} (got {getattr(cfg, key)!r})") from original
    check_built_for_fsdp2(entry, optimizer, ctx)
    apply_group_rules(optimizer, rules, ctx._rule_of, entry.name)
    return optimizer


def build_from_entry(entry: OptimizerEntry, ctx: BuildContext, cfg: OptimizerConfig, *, check: bool = True):
    """Run :func:`check_optimizer` (the one check path), then the entry's factory.

    ``check=False`` skips the checks: the caller (the trainer) ran them already. With
    ``layerwise: true`` the optimizer the factory returns is made layerwise (:mod:`optiplug.layerwise`).
    """
    require_trainable(ctx)
    if check:
        check_optimizer(entry, ctx, cfg)
    optimizer = _built_optimizer(entry, ctx, cfg)
    if getattr(cfg, "offload", "none") == "cpu":
        return offloaded(optimizer)
    if getattr(cfg, "layerwise", False):
        enable_layerwise(optimizer, ctx)
    else:
        release_parameters(optimizer)  # a layerwise optimizer built before on these parameters stops stepping them
    return optimizer


def check_before_training(
    ctx: BuildContext,
    optimizer: OptimizerConfig,
    scheduler: SchedulerConfig | None = None,
    num_training_steps: int = 0,
) -> list[str]:
    """Every check of the optimizer and scheduler a run makes before its first step, without training.

    Meant for a model without weights (built on torch's ``meta`` device, as ``optiplug validate`` does):
    :func:`check_optimizer`, then the optimizer built as the run builds it (so its constructor's own
    argument checks and the per-group options run), then the scheduler built on it for
    ``num_training_steps`` (0: not known yet, left to the run). What is built is dropped.

    On a meta model, a plugin's check or constructor that raises something other than optiplug's
    errors may need real tensors: it is not refused but returned, to run when training starts.

    Returns:
        The checks left to the run, each ``"what (why)"``.

    Raises:
        ConfigError, MissingDependencyError, PluginError.
    """
    entry = get_entry(optimizer.name)
    meta = any(p.is_meta for _, p in ctx.named_parameters())
    left: list[str] = []
    try:
        check_optimizer(entry, ctx, optimizer)
    except _Raised as error:
        if not meta:
            raise
        left.append(f"{error.what} ({error.cause})")
    try:
        built = _built_optimizer(entry, ctx, optimizer)
    except _Raised as error:
        if not meta:
            raise
        return [*left, f"{error.what} ({error.cause})"]
    if getattr(optimizer, "offload", "none") == "cpu":
        left.append("the CPU offload wrapper (torchao needs the parameters on the accelerator)")
    if scheduler is None:
        return left
    if num_training_steps <= 0:
        return [*left, f"scheduler {scheduler.name!r} (the run's step count comes from the data)"]
    try:
        schedule = build_scheduler(built, scheduler, num_training_steps)
    except _Raised as error:
        if not meta:
            raise
        left.append(f"{error.what} ({error.cause})")
        return left
    check_evaluated(schedule, scheduler.name, ctx.args)
    return left


def check_evaluated(schedule: Any, name: str, args: Any) -> None:
    """Refuse a schedule the Trainer steps only after an evaluation (:func:`steps_on_evaluation`) when the
    arguments never evaluate: its rate would never change (checked for the app's runs and for any OptiTrainer)."""
    strategy = getattr(args, "eval_strategy", None)
    if steps_on_evaluation(schedule) and str(getattr(strategy, "value", strategy)) == "no":
        raise ConfigError(
            f"scheduler {name!r} changes the rate only after an evaluation, and eval_strategy is 'no': the "
            "rate would never change; evaluate during training (an evaluation dataset and eval_strategy 'steps'), "
            "or choose another scheduler"
        )


def steps_on_evaluation(scheduler: Any) -> bool:
    """True for a scheduler the Trainer steps with a metric after each evaluation, never after a training step
    (torch's ``ReduceLROnPlateau``, transformers' ``GreedyLR``)."""
    import torch
    from transformers.optimization import GreedyLR

    return isinstance(scheduler, (torch.optim.lr_scheduler.ReduceLROnPlateau, GreedyLR))


def check_param_groups(ctx: BuildContext, cfg: OptimizerConfig) -> None:
    """Raise :class:`ConfigError` when an ``optimizer.param_groups`` entry takes no parameter of ``ctx.model``."""
    rules = tuple(getattr(cfg, "param_groups", ()))
    if rules:
        BuildContext(model=ctx.model, trainer=ctx.trainer, args=ctx.args, param_group_rules=rules).param_groups()


def build_optimizer(model: nn.Module, config: OptimizerConfig | str | dict | None = None, **fields: Any):
    """Build a registered optimizer for ``model``'s trainable parameters, in any training loop.

    Args:
        model: the model.
        config: an optimizer config, a registered name, a mapping with ``name``, or None for the default.
        **fields: config fields overriding ``config``'s (``lr=1e-3``).

    Returns:
        The optimizer (a ``torch.optim.Optimizer``).

    Raises:
        UnknownNameError, ConfigError, MissingDependencyError.
    """
    if not callable(getattr(model, "named_parameters", None)):
        raise ConfigError(
            f"build_optimizer needs the model (a torch.nn.Module) first, got {type(model).__name__}: "
            "build_optimizer(model, 'adamw', lr=1e-3)"
        )
    cfg = parse_optimizer(config, **fields)
    entry = get_entry(cfg.name)
    return build_from_entry(entry, BuildContext(model=model), cfg)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    config: SchedulerConfig | str | dict | None = None,
    num_training_steps: int = 0,
    **fields: Any,
):
    """Build a registered learning-rate scheduler on ``optimizer`` (unwrapped from accelerate first).

    Args:
        optimizer: the optimizer whose learning rates the scheduler sets.
        config: a scheduler config, a registered name, a mapping with ``name``, or None for the default.
        num_training_steps: total optimizer steps of the run; a scheduler that needs it (every decaying
            schedule) refuses 0.
        **fields: config fields overriding ``config``'s (``warmup_steps=100``).

    Raises:
        UnknownNameError, ConfigError (also for a missing ``num_training_steps``, and from the entry's
        ``check``: a warmup not shorter than the run), MissingDependencyError, PluginError (the entry's
        factory raised).
    """
    cfg = parse_scheduler(config, **fields)
    entry = get_scheduler_entry(cfg.name)
    entry.check_requires()
    steps = int(num_training_steps)
    if steps < 0:
        raise ConfigError(f"num_training_steps: expected a positive number of steps (got {steps})")
    raw = unwrap_optimizer(optimizer)
    if not isinstance(getattr(raw, "param_groups", None), list):  # the caller's mistake, not the plugin's
        raise ConfigError(
            f"build_scheduler: expected an optimizer (with param_groups) to schedule, got {type(optimizer).__name__}; "
            "build it first (optiplug.build_optimizer(model, ...)) and pass it"
        )
    if steps > 0:
        ctx = ScheduleContext(optimizer=raw, num_training_steps=steps)
        if entry.check is not None:
            entry.check(ctx, cfg)
    else:
        ctx = _StepsUnknown(optimizer=raw, num_training_steps=0)
        ctx.scheduler_name = entry.name  # type: ignore[attr-defined]
    with _missing_modules_named("scheduler", entry.name, entry.requires):
        return _called("scheduler", entry.name, "build", entry.build, ctx, cfg)
