"""Registry entries: what a plugin hands to the ``register`` callable its hook receives.

A plugin describes each optimizer with one frozen :class:`OptimizerEntry` (and each scheduler
with a :class:`SchedulerEntry`). The registry key is the ``Literal`` default of the config
class's ``name`` field.
"""

from __future__ import annotations

import importlib.metadata
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from optiplug.configs import OptimizerConfig, SchedulerConfig
from optiplug.errors import MissingDependencyError, PluginError

if TYPE_CHECKING:
    from optiplug.context import BuildContext, ParamShape, ScheduleContext
    from optiplug.patches import Patch

__all__ = ["OptimizerEntry", "Registered", "SchedulerEntry", "name_of"]

C = TypeVar("C")


def name_of(config: Any, base: type, kind: str) -> str:
    """The registry key: the ``Literal`` default of ``config.name``."""
    if not (isinstance(config, type) and issubclass(config, base)):
        raise PluginError(f"{kind} entry config {config!r} must be a subclass of optiplug.{base.__name__}")
    name_field = typing.cast("type[OptimizerConfig]", config).model_fields.get("name")
    literal = typing.get_args(name_field.annotation) if name_field is not None else ()
    if (
        name_field is None
        or typing.get_origin(name_field.annotation) is not typing.Literal
        or len(literal) != 1
        or name_field.default != literal[0]
    ):
        raise PluginError(
            f"{kind} config {config.__qualname__} must declare its name as "
            f'`name: Literal["..."] = "..."` (one literal, equal to the default)'
        )
    return str(literal[0])


def _check_requires(kind: str, name: str, requires: Sequence[str]) -> None:
    for requirement in requires:
        dist = requirement.split(";")[0].strip()
        for sep in "<>=!~[ ":
            dist = dist.split(sep)[0]
        try:
            importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            raise MissingDependencyError(
                f"{kind} {name!r} needs the package {dist!r}, which is not installed: pip install '{requirement}'"
            ) from None


@dataclass(frozen=True, kw_only=True)
class OptimizerEntry(Generic[C]):
    """One optimizer a plugin offers.

    Attributes:
        config: the pydantic config class (a subclass of :class:`OptimizerConfig`); its
            ``name`` literal is the registry key.
        build: ``build(ctx, cfg) -> torch.optim.Optimizer``. Import heavy packages inside it.
        summary: one line for ``optiplug list``.
        callbacks: ``callbacks(cfg) -> list[TrainerCallback]`` added to the trainer when this
            optimizer is selected, and only then.
        patches: ``patches(cfg) -> list[Patch]`` applied for the length of ``train()``.
        check: ``check(ctx, cfg)`` raises :class:`ConfigError` when the setup (distributed
            engine, gradient accumulation, adapters, ...) is one this optimizer cannot train.
        requires: distributions the optimizer needs (``"galore-torch"``), for the install hint.
        state_bytes: ``state_bytes(shapes, cfg) -> int``, the analytic optimizer-state size
            for the trainable parameters ``shapes`` (a sequence of :class:`ParamShape`).
        grad_bytes: ``grad_bytes(shapes, cfg) -> int``, the peak gradient memory when the
            optimizer holds gradients for only some parameters at a time (block-wise
            optimizers); None means every trainable parameter has a gradient.
        per_parameter: True when stepping the parameters one at a time gives the same result as
            one step over all of them (each update reads only its own parameter's gradient and
            state; no group- or optimizer-wide counter advances in ``step()``). Such an optimizer
            can train with ``layerwise: true``: the core steps each parameter in its gradient
            hook, with the optimizer's ``step_parameters(group, params)`` when it has one,
            otherwise with ``step()`` over ``param_groups`` narrowed to that one parameter.
        default_scheduler: the scheduler this optimizer runs with when the run names none (a
            schedule-free optimizer brings its own schedule: ``"constant"``); None: the usual default.
        describe: ``describe(shapes, cfg) -> str``, one line saying how the optimizer treats the
            trainable parameters ``shapes`` (Muon: which go to Muon, which to AdamW), shown by
            ``optiplug estimate`` under its table and in the run header.
        whole_matrices: True when the optimizer updates some parameters as whole matrices (an SVD,
            Newton-Schulz, row or column statistics) and ``build`` returns an
            :class:`optiplug.MatrixOptimizer`: under FSDP2 the core then runs each matrix's update
            once, on one owner process (:mod:`optiplug.sharded`). Refuse what it cannot train in
            ``check`` with :func:`optiplug.check_whole_matrices`.
    """

    config: type[C]
    build: Callable[[BuildContext, C], Any]
    summary: str = ""
    callbacks: Callable[[C], list[Any]] | None = None
    patches: Callable[[C], list[Patch]] | None = None
    check: Callable[[BuildContext, C], None] | None = None
    requires: tuple[str, ...] = ()
    state_bytes: Callable[[Sequence[ParamShape], C], int] | None = None
    grad_bytes: Callable[[Sequence[ParamShape], C], int] | None = None
    per_parameter: bool = False
    default_scheduler: str | None = None
    describe: Callable[[Sequence[ParamShape], C], str] | None = None
    whole_matrices: bool = False

    def __post_init__(self) -> None:
        name_of(self.config, OptimizerConfig, "optimizer")
        object.__setattr__(self, "requires", tuple(self.requires))

    @property
    def name(self) -> str:
        return name_of(self.config, OptimizerConfig, "optimizer")

    def check_requires(self) -> None:
        """Raise :class:`MissingDependencyError` naming the first required package not installed."""
        _check_requires("optimizer", self.name, self.requires)


@dataclass(frozen=True, kw_only=True)
class SchedulerEntry(Generic[C]):
    """One learning-rate scheduler a plugin offers.

    Attributes:
        config: the pydantic config class (a subclass of :class:`SchedulerConfig`).
        build: ``build(ctx, cfg) -> LRScheduler``; ``ctx`` is a :class:`ScheduleContext`.
        summary: one line for ``optiplug list``.
        requires: distributions the scheduler needs.
        describe: ``describe(ctx, cfg) -> str``, one line on the schedule a run of
            ``ctx.num_training_steps`` steps gets (WSD: its warmup, stable and decay steps), shown
            in the run header; ``ctx`` is the :class:`ScheduleContext` the factory would get.
    """

    config: type[C]
    build: Callable[[ScheduleContext, C], Any]
    summary: str = ""
    requires: tuple[str, ...] = ()
    describe: Callable[[ScheduleContext, C], str] | None = None

    def __post_init__(self) -> None:
        name_of(self.config, SchedulerConfig, "scheduler")
        object.__setattr__(self, "requires", tuple(self.requires))

    @property
    def name(self) -> str:
        return name_of(self.config, SchedulerConfig, "scheduler")

    def check_requires(self) -> None:
        """Raise :class:`MissingDependencyError` naming the first required package not installed."""
        _check_requires("scheduler", self.name, self.requires)


@dataclass(frozen=True)
class Registered:
    """A registry row: the entry and the plugin that registered it."""

    kind: str
    entry: Any
    plugin: str

    @property
    def name(self) -> str:
        return self.entry.name
