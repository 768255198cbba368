"""Registry entries and lookups.

A plugin describes each optimizer with one frozen :class:`OptimizerEntry` (and each scheduler
with a :class:`SchedulerEntry`) and hands it to the ``register`` callable its hook receives.
The registry key is the ``Literal`` default of the config class's ``name`` field.
"""

from __future__ import annotations

import importlib.metadata
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from optiplug.config import OptimizerConfig, SchedulerConfig
from optiplug.errors import DuplicateNameError, MissingDependencyError, PluginError, UnknownNameError

if TYPE_CHECKING:
    from optiplug.context import BuildContext, ParamShape, ScheduleContext
    from optiplug.patches import Patch

__all__ = [
    "OptimizerEntry",
    "SchedulerEntry",
    "Registered",
    "get_entry",
    "get_scheduler_entry",
    "list_optimizers",
    "list_schedulers",
    "optimizer_names",
    "scheduler_names",
]

C = TypeVar("C")


def _name_of(config: type, base: type, kind: str) -> str:
    """The registry key: the ``Literal`` default of ``config.name``."""
    if not (isinstance(config, type) and issubclass(config, base)):
        raise PluginError(f"{kind} entry config {config!r} must be a subclass of optiplug.{base.__name__}")
    name_field = config.model_fields.get("name")
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

    def __post_init__(self) -> None:
        _name_of(self.config, OptimizerConfig, "optimizer")
        object.__setattr__(self, "requires", tuple(self.requires))

    @property
    def name(self) -> str:
        return _name_of(self.config, OptimizerConfig, "optimizer")

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
    """

    config: type[C]
    build: Callable[[ScheduleContext, C], Any]
    summary: str = ""
    requires: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _name_of(self.config, SchedulerConfig, "scheduler")
        object.__setattr__(self, "requires", tuple(self.requires))

    @property
    def name(self) -> str:
        return _name_of(self.config, SchedulerConfig, "scheduler")

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


@dataclass
class _Tables:
    optimizers: dict[str, Registered] = field(default_factory=dict)
    schedulers: dict[str, Registered] = field(default_factory=dict)


_cache: tuple[int, _Tables] | None = None


def _duplicate_message(kind: str, name: str, first: str, second: str) -> str:
    from optiplug.plugins import deny_list_name

    message = f"{kind} {name!r} is registered twice, by plugins {first!r} and {second!r}: uninstall one"
    deny = deny_list_name(second) or deny_list_name(first)
    return message + (f", or set OPTIPLUG_DISABLE_PLUGINS={deny}" if deny else "")


def _collect() -> _Tables:
    from optiplug.plugins import get_plugin_manager, plugins_generation, record_failure

    global _cache
    generation = plugins_generation()
    if _cache is not None and _cache[0] == generation:
        return _cache[1]
    pm = get_plugin_manager()
    tables = _Tables()

    def make_register(kind: str, table: dict[str, Registered], entry_type: type, plugin: str):
        def register(entry: Any) -> None:
            if not isinstance(entry, entry_type):
                raise PluginError(
                    f"plugin {plugin!r} registered {entry!r} as a {kind}; expected optiplug.{entry_type.__name__}"
                )
            previous = table.get(entry.name)
            if previous is not None:
                raise DuplicateNameError(_duplicate_message(kind, entry.name, previous.plugin, plugin))
            table[entry.name] = Registered(kind, entry, plugin)

        return register

    for hook, kind, table, entry_type in (
        (pm.hook.register_optimizers, "optimizer", tables.optimizers, OptimizerEntry),
        (pm.hook.register_schedulers, "scheduler", tables.schedulers, SchedulerEntry),
    ):
        # Call each implementation on its own so every name is recorded with its plugin, and a
        # plugin whose hook raises is reported and left out while the others still register.
        for impl in hook.get_hookimpls():  # registration order: the default plugin first
            plugin = pm.get_name(impl.plugin) or repr(impl.plugin)
            scratch: dict[str, Registered] = {}
            try:
                impl.function(register=make_register(kind, scratch, entry_type, plugin))
            except DuplicateNameError:
                raise
            except Exception as error:  # a broken plugin must not break every command
                record_failure(plugin, f"register_{kind}s raised {type(error).__name__}: {error}")
                continue
            for name, row in scratch.items():
                if name in table:
                    raise DuplicateNameError(_duplicate_message(kind, name, table[name].plugin, plugin))
                table[name] = row
    _cache = (generation, tables)
    return tables


def list_optimizers() -> list[Registered]:
    """Every registered optimizer, sorted by name."""
    return [r for _, r in sorted(_collect().optimizers.items())]


def list_schedulers() -> list[Registered]:
    """Every registered scheduler, sorted by name."""
    return [r for _, r in sorted(_collect().schedulers.items())]


def optimizer_names() -> list[str]:
    return sorted(_collect().optimizers)


def scheduler_names() -> list[str]:
    return sorted(_collect().schedulers)


def lookup(kind: str, name: str) -> Registered:
    """The registry row for ``name``; ``kind`` is ``"optimizer"`` or ``"scheduler"``."""
    tables = _collect()
    table = tables.optimizers if kind == "optimizer" else tables.schedulers
    try:
        return table[name]
    except (KeyError, TypeError):
        raise UnknownNameError(kind, name, table) from None


def get_entry(name: str) -> OptimizerEntry:
    """The :class:`OptimizerEntry` registered as ``name``.

    Raises:
        UnknownNameError: no plugin registered ``name`` (the message suggests close names).
    """
    return lookup("optimizer", name).entry


def get_scheduler_entry(name: str) -> SchedulerEntry:
    """The :class:`SchedulerEntry` registered as ``name``."""
    return lookup("scheduler", name).entry
