"""``OptiTrainerMixin``: a Trainer whose optimizer and scheduler come from the registry.

The mixin composes with any ``transformers.Trainer`` subclass::

    class MySFTTrainer(OptiTrainerMixin, SFTTrainer): ...

It overrides ``create_optimizer``/``create_scheduler`` (never ``optimizers=``, which breaks
under DeepSpeed and FSDP), runs the selected entry's ``check`` before any step, and for the
length of ``train()`` applies the entry's patches and callbacks, undoing them on exit.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from transformers import Trainer

from optiplug.callbacks import GroupRatesCallback, SaveProcessorCallback
from optiplug.configs import OptimizerConfig, SchedulerConfig
from optiplug.context import BuildContext
from optiplug.entries import OptimizerEntry
from optiplug.errors import ConfigError
from optiplug.factory import build_from_entry, build_scheduler, check_evaluated, check_optimizer, steps_on_evaluation
from optiplug.layerwise import layerwise_stepper, owner_of
from optiplug.patches import Patch, applied
from optiplug.registry import (
    get_entry,
    get_plugin_manager,
    parse_optimizer,
    parse_scheduler,
)
from optiplug.transformers_args import (
    TRAINING_ARGUMENT_FIELDS,
    optim_name,
    optimizer_from_arguments,
    scheduler_from_arguments,
    training_argument_value,
)
from optiplug.unwrap import unwrap_optimizer

__all__ = ["OptiTrainer", "OptiTrainerMixin"]

logger = logging.getLogger(__name__)


def _layerwise_clip_grad_norm(accelerator: Any, original: Any) -> Any:
    def clip_grad_norm_(parameters: Any, max_norm: float, norm_type: float = 2, **kwargs: Any) -> Any:
        params = [parameters] if hasattr(parameters, "grad") else list(parameters)
        stepper = owner_of(params)
        if stepper is None:
            return original(params, max_norm, norm_type, **kwargs)
        return stepper.grad_norm()

    return clip_grad_norm_


def layerwise_patches(cfg: Any) -> list[Patch]:
    """What the Trainer needs with ``layerwise: true``: its clipping call returns the true global norm of the
    gradients the hooks already consumed (and clipped per parameter), instead of the 0 of no gradients."""
    if not getattr(cfg, "layerwise", False):
        return []
    reason = (
        "layerwise stepping steps and frees each gradient during backward (clipped per parameter); "
        "report the global norm they had"
    )
    return [Patch("accelerator", "clip_grad_norm_", _layerwise_clip_grad_norm, reason)]


def _check_optim_agrees(args: Any, cfg: OptimizerConfig) -> None:
    """``optimizer=`` with a non-default ``args.optim`` naming another optimizer is an error (one line)."""
    from optiplug.errors import OptiplugError

    name, default = optim_name(args), _argument_defaults(args).get("optim")
    if name == str(getattr(default, "value", default)):
        return
    try:
        chosen = optimizer_from_arguments(args)
    except OptiplugError:
        chosen = None
    if chosen is None or chosen.name != cfg.name:
        raise ConfigError(
            f"TrainingArguments.optim={name!r} and optimizer={cfg.name!r} disagree: the optimizer section selects "
            "the optimizer; leave TrainingArguments.optim at its default (or drop optimizer= to use it)"
        )


def _argument_defaults(args: Any) -> dict[str, Any]:
    """The defaults of ``args``'s dataclass (``TrainingArguments`` or a subclass), by field name."""
    import dataclasses

    return {f.name: f.default for f in dataclasses.fields(type(args)) if f.init}


def _scheduler_left_at_default(args: Any, warmup_too: bool = True) -> bool:
    """True when ``args`` keep TrainingArguments' own scheduler default (``linear``, no kwargs, and no warmup unless
    ``warmup_too`` is False)."""
    defaults = _argument_defaults(args)
    name = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    default = getattr(defaults.get("lr_scheduler_type"), "value", defaults.get("lr_scheduler_type"))
    warmup = warmup_too and bool(getattr(args, "warmup_steps", 0) or getattr(args, "warmup_ratio", 0))
    return name == default and not args.lr_scheduler_kwargs and not warmup


def _warn_ignored_arguments(args: Any, cfg: OptimizerConfig) -> None:
    """Say so when TrainingArguments set a value the optimizer config overrides (one source of truth)."""
    defaults = _argument_defaults(args)
    for key in TRAINING_ARGUMENT_FIELDS:
        value, given = training_argument_value(cfg, key), getattr(args, key, None)
        if value is not None and given != defaults.get(key) and given != value:
            logger.warning(
                "TrainingArguments.%s=%r is not used: the optimizer config's value %r is (set it in the optimizer)",
                key,
                given,
                value,
            )


def _follow_eval_loss(args: Any, scheduler: Any) -> None:
    """A scheduler that follows a metric (``ReduceLROnPlateau``, ``GreedyLR``) follows the evaluation loss unless
    the arguments name another (``metric_for_best_model``).

    The Trainer steps such a scheduler after each evaluation with ``metric_for_best_model``, which
    ``TrainingArguments`` only defaults to ``"loss"`` when its own ``lr_scheduler_type`` is a plateau
    schedule; without it the first evaluation fails.
    """
    if steps_on_evaluation(scheduler) and args.metric_for_best_model is None:
        args.metric_for_best_model = "loss"
        if args.greater_is_better is None:
            args.greater_is_better = False


if TYPE_CHECKING:  # type checkers see the Trainer the mixin is mixed into
    _TrainerBase = Trainer
else:
    _TrainerBase = object


class OptiTrainerMixin(_TrainerBase):
    """Mix into a ``transformers.Trainer`` subclass to take optimizer and scheduler from the registry.

    Args:
        optimizer: the optimizer: a config, a registered name, a mapping with ``name``, or None
            for the default optimizer with the learning rate, betas, eps and weight decay of ``args``.
        scheduler: the scheduler, likewise; None uses ``args.lr_scheduler_type`` and its warmup.
        processor: a processor or tokenizer to save into every checkpoint and the output directory.
        run_config: any object describing the run, handed unchanged to the ``trainer_callbacks`` hook as
            ``config`` (``optiplug train`` passes its ``optiplug.app.RunConfig``; None by default).
        *args, **kwargs: the Trainer's own arguments (except ``optimizers``).
    """

    def __init__(
        self,
        *args: Any,
        optimizer: OptimizerConfig | str | dict | None = None,
        scheduler: SchedulerConfig | str | dict | None = None,
        processor: Any = None,
        run_config: Any = None,
        **kwargs: Any,
    ):
        given = kwargs.get("optimizers") or (None, None)
        for key, used in (
            ("optimizers", any(part is not None for part in given)),
            ("optimizer_cls_and_kwargs", kwargs.get("optimizer_cls_and_kwargs") is not None),
        ):
            if used:
                raise ConfigError(
                    "OptiTrainer builds the optimizer and scheduler from the registry: pass optimizer= and "
                    f"scheduler= (a name, mapping or config), not {key}="
                )
        super().__init__(*args, **kwargs)
        self.optiplug_run_config = run_config
        self.optimizer_config: OptimizerConfig = (
            optimizer_from_arguments(self.args) if optimizer is None else parse_optimizer(optimizer)
        )
        self.optimizer_entry: OptimizerEntry = get_entry(self.optimizer_config.name)
        own = self.optimizer_entry.default_scheduler
        # The optimizer brings its schedule and the arguments chose none (selected by args.optim, the optimizer
        # took the arguments' warmup, as transformers' Trainer hands it to schedule-free optimizers).
        if (
            scheduler is None
            and own is not None
            and _scheduler_left_at_default(self.args, warmup_too=optimizer is not None)
        ):
            scheduler = own
        self._scheduler_warmup_from_args = scheduler is None
        self.scheduler_config: SchedulerConfig = (
            scheduler_from_arguments(self.args) if scheduler is None else parse_scheduler(scheduler)
        )
        if optimizer is not None:
            _check_optim_agrees(self.args, self.optimizer_config)
            _warn_ignored_arguments(self.args, self.optimizer_config)
        for callback in self._plugin_callbacks():
            self.add_callback(callback)
        if processor is not None:
            self.add_callback(SaveProcessorCallback(processor))

    def _plugin_callbacks(self) -> list[Any]:
        results = get_plugin_manager().hook.trainer_callbacks(trainer=self, config=self.optiplug_run_config)
        return [callback for result in results if result for callback in result]

    def optiplug_context(self, model: Any = None) -> BuildContext:
        """The :class:`BuildContext` the entry's ``check`` and ``build`` see."""
        model = self.model if model is None else model
        if model is None:
            raise ConfigError("the trainer has no model: pass model= to the trainer")
        return BuildContext(model=model, trainer=self, args=self.args, scheduler_config=self.scheduler_config)

    def check_optimizer(self) -> None:
        """Run the optimizer's checks (:func:`optiplug.factory.check_optimizer`, the one check path), once.

        ``optiplug train`` calls it before writing anything; ``train()`` and ``create_optimizer()``
        call it again, which does nothing unless the optimizer was changed in between.

        Raises:
            ConfigError, MissingDependencyError, PluginError.
        """
        entry, cfg = self.optimizer_entry, self.optimizer_config
        checked = getattr(self, "_optiplug_checked", None)
        if checked is not None and checked[0] is entry and checked[1] is cfg:
            return
        check_optimizer(entry, self.optiplug_context(), cfg)
        self._optiplug_checked = (entry, cfg)

    def mark_optimizer_checked(self) -> None:
        """Record that the optimizer's checks passed already (``optiplug train`` ran them on the model's skeleton,
        with nothing left that needs the weights): ``train()`` does not run them again."""
        self._optiplug_checked = (self.optimizer_entry, self.optimizer_config)

    def create_optimizer(self, model: Any = None):
        if self.optimizer is None:
            self.check_optimizer()
            ctx = self.optiplug_context(model)
            self.optimizer = build_from_entry(self.optimizer_entry, ctx, self.optimizer_config, check=False)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None):
        if self.lr_scheduler is None:
            # Always the raw optimizer: schedulers built on accelerate's wrapper can miss per-parameter optimizers.
            raw = unwrap_optimizer(self.optimizer if optimizer is None else optimizer)
            fields = {}
            if self._scheduler_warmup_from_args and "warmup_steps" in type(self.scheduler_config).model_fields:
                fields["warmup_steps"] = self.args.get_warmup_steps(num_training_steps)
            self.lr_scheduler = build_scheduler(raw, self.scheduler_config, num_training_steps, **fields)
            check_evaluated(self.lr_scheduler, self.scheduler_config.name, self.args)
            self._created_lr_scheduler = True
            _follow_eval_loss(self.args, self.lr_scheduler)
        return self.lr_scheduler

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        # An optimizer may report values of its own (``log_values() -> dict``), e.g. BAdam's active block.
        raw = unwrap_optimizer(self.optimizer) if self.optimizer is not None else None
        extra = getattr(raw, "log_values", None)
        if callable(extra) and "loss" in logs:
            logs = {**logs, **extra()}
        rates = getattr(self, "_optiplug_group_rates", None)
        if "loss" in logs and rates is not None:  # optimizer.param_groups: each group's rate, lr/<label>
            logs = {**logs, **rates.rates}
        return super().log(logs, *args, **kwargs)

    def train(self, *args: Any, **kwargs: Any):
        if getattr(self.args, "fsdp", None) and not getattr(self, "is_fsdp_enabled", False):
            logger.warning(
                "TrainingArguments.fsdp (training.fsdp in a run config) is set but accelerate runs plain DDP here: "
                "FSDP needs GPUs"
            )
        self.check_optimizer()
        entry, cfg = self.optimizer_entry, self.optimizer_config
        callbacks = list(entry.callbacks(cfg)) if entry.callbacks else []
        self._optiplug_group_rates = GroupRatesCallback()
        callbacks.append(self._optiplug_group_rates)
        patches = list(entry.patches(cfg)) if entry.patches else []
        patches += layerwise_patches(cfg)  # the core's, for layerwise: true on any per-parameter optimizer
        for callback in callbacks:
            self.add_callback(callback)
        self._set_layerwise_active(True)  # a second train() with the same optimizer
        try:
            with applied(self, patches):
                return super().train(*args, **kwargs)
        finally:
            for callback in callbacks:
                self.remove_callback(callback)
            self._set_layerwise_active(False)

    def _set_layerwise_active(self, active: bool) -> None:
        """Layerwise hooks step only during ``train()``: a backward pass after it changes no weight."""
        stepper = layerwise_stepper(self.optimizer) if self.optimizer is not None else None
        if stepper is not None:
            stepper.active = active


class OptiTrainer(OptiTrainerMixin, Trainer):
    """``transformers.Trainer`` with optimizer and scheduler from the optiplug registry."""
