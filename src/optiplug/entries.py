"""Registry entries: what a plugin hands to the ``register`` callable its hook receives.

A plugin describes each optimizer with one frozen :class:`OptimizerEntry` (and each scheduler
with a :class:`SchedulerEntry`). The registry key is the ``Literal`` default of the config
class's ``name`` field. An entry may also answer to other names, each an :class:`Alias`: the
entry with some fields preset (transformers' ``paged_adamw_8bit`` is an 8-bit paged AdamW entry
with ``bits=8, paged=True``).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import types
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from optiplug.configs import OptimizerConfig, SchedulerConfig
from optiplug.errors import MissingDependencyError, PluginError

if TYPE_CHECKING:
    from optiplug.context import BuildContext, ParamShape, ScheduleContext
    from optiplug.patches import Patch

__all__ = [
    "Alias",
    "LazyConfig",
    "OptimizerClass",
    "OptimizerEntry",
    "Registered",
    "SchedulerEntry",
    "lazy_attributes",
    "name_of",
]

C = TypeVar("C")
E = TypeVar("E", "OptimizerEntry[Any]", "SchedulerEntry[Any]")


@dataclass(frozen=True)
class Alias:
    """Another name for an entry: selecting it selects the entry with the ``preset`` fields.

    Attributes:
        name: the alias, selectable wherever the entry's own name is (configs, the Python API).
        preset: config fields the alias sets. A user value that contradicts one is an error; the
            parsed config carries the entry's canonical name and these values.
        summary: one line for ``optiplug list`` (default: the preset, in words).
        transformers: True when this alias is what transformers means by ``TrainingArguments.optim``
            (for an optimizer) or ``lr_scheduler_type`` (for a scheduler) equal to ``name``. Such an
            alias may share its name with a canonical entry (transformers' ``sgd`` is optiplug's ``sgd``
            with ``momentum=0``): the transformers arguments look at transformers aliases first, a
            config's ``name`` looks at canonical names first.
        arguments: for a transformers alias, ``arguments(args, optim_args) -> fields``: the config fields
            transformers' Trainer takes from ``TrainingArguments`` and the parsed ``optim_args`` for this name,
            with its defaults (``optiplug.transformers_fields`` builds the usual ones). None: the learning rate,
            Adam betas and epsilon and weight decay the config has fields for, and each ``optim_args`` key as
            the field of that name. On a scheduler alias: ``arguments(args, lr_scheduler_kwargs) -> fields``.
    """

    name: str
    preset: Mapping[str, Any] = field(default_factory=dict)
    summary: str = ""
    transformers: bool = False
    arguments: Callable[[Any, Mapping[str, str]], Mapping[str, Any]] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise PluginError(f"an alias needs a non-empty name, got {self.name!r}")
        if not isinstance(self.preset, Mapping) or not all(isinstance(key, str) for key in self.preset):
            raise PluginError(f"alias {self.name!r}: preset must be a mapping of field names to values")
        if "name" in self.preset:
            raise PluginError(f"alias {self.name!r}: preset cannot set 'name' (the alias is the name)")
        object.__setattr__(self, "preset", types.MappingProxyType(dict(self.preset)))

    def describe(self) -> str:
        """``kernel='fused', momentum=0`` (the preset in words), or ``same fields`` for a plain second name."""
        return ", ".join(f"{key}={value!r}" for key, value in self.preset.items()) or "same fields"


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


@dataclass(frozen=True)
class LazyConfig:
    """A config class built on first use: ``OptimizerEntry(config=LazyConfig("po_lion", make_lion_config), ...)``.

    For plugins that generate many config classes (a bridge to another library's optimizers): building a
    pydantic class costs start-up time, and ``optiplug list`` needs only names and summaries. ``load()``
    returns the class, whose ``name`` literal must be ``name``; it is called once, when the entry's ``config``
    is first read (parsing, ``optiplug show``, ``schema``).
    """

    name: str
    load: Callable[[], type]

    @classmethod
    def from_module(cls, name: str, path: str) -> LazyConfig:
        """The config class at ``path``, ``"module:ClassName"``, imported on first use: a plugin whose package does
        not import its config module keeps that module's pydantic classes out of ``optiplug list``.

        ``OptimizerEntry(config=LazyConfig.from_module("bnb_adamw", "optiplug_bitsandbytes.config:BnbAdamWConfig"))``.
        A module that fails to import then fails where the config is first read, not when the plugin loads.
        """
        module, _, attribute = path.partition(":")
        if not module or not attribute:
            raise PluginError(f"LazyConfig {name!r}: the path must be 'module:ClassName', got {path!r}")
        return cls(name, functools.partial(_attribute, module, attribute))


def _attribute(module: str, attribute: str) -> Any:
    return getattr(importlib.import_module(module), attribute)


def lazy_attributes(package: str, module: str, names: Collection[str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) that gives ``names`` from ``module``, imported on first use: a plugin
    package keeps its config classes importable from it (``from my_lion import LionConfig``) without importing their
    module itself. ``__getattr__ = optiplug.lazy_attributes(__name__, "my_lion.config", ["LionConfig"])``."""
    wanted = frozenset(names)

    def __getattr__(name: str) -> Any:
        if name in wanted:
            return getattr(importlib.import_module(module), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


@dataclass(frozen=True)
class OptimizerClass:
    """An entry's ``build`` declared as data: the optimizer's class, the config fields it takes, computed arguments.

    ``OptimizerEntry(config=AdamWConfig, build=OptimizerClass("torch.optim.AdamW", ("betas", "eps"), computed=kernel))``
    builds ``torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **kernel(cfg, groups))`` with
    ``groups = ctx.param_groups(cfg.weight_decay)``: the decay and no-decay groups (and the user's
    ``optimizer.param_groups``) carry the weight decay. It is an entry's ``build`` like any other, so every route
    (checks, the skeleton build, ``layerwise``, aliases) takes it unchanged.

    Attributes:
        path: the class, ``"package.module.Class"``; imported when the first optimizer is built, so declaring it
            imports nothing (``optiplug list`` stays free of torch).
        fields: the config fields passed as the constructor's keyword arguments of the same name: the config
            holds their defaults and checks.
        computed: ``computed(cfg, groups) -> mapping`` of further keyword arguments, computed from the config and
            the parameters at hand (the kernel: ``lambda cfg, groups: optiplug.kernel_kwargs(cfg.kernel, groups)``).
    """

    path: str
    fields: tuple[str, ...] = ()
    computed: Callable[[Any, list[dict[str, Any]]], Mapping[str, Any]] | None = None

    def __post_init__(self) -> None:
        module, _, name = self.path.rpartition(".") if isinstance(self.path, str) else ("", "", "")
        if not module or not name:
            raise PluginError(f"OptimizerClass needs the class as 'package.module.Class', got {self.path!r}")
        if isinstance(self.fields, str) or not all(isinstance(field, str) for field in self.fields):
            raise PluginError(
                f"OptimizerClass({self.path!r}): fields must be a tuple of field names, got {self.fields!r}"
            )
        object.__setattr__(self, "fields", tuple(self.fields))

    def load(self) -> Any:
        """The class (imports its module)."""
        module, _, name = self.path.rpartition(".")
        found = getattr(importlib.import_module(module), name, None)
        if not isinstance(found, type):
            raise PluginError(f"OptimizerClass({self.path!r}): {module} has no class {name!r}")
        return found

    def __call__(self, ctx: BuildContext, cfg: Any) -> Any:
        missing = [field for field in ("lr", *self.fields) if field not in type(cfg).model_fields]
        if missing:
            raise PluginError(
                f"optimizer {cfg.name!r}: OptimizerClass({self.path!r}) passes {', '.join(missing)}, which its config "
                f"{type(cfg).__name__} has no field for; report it to the plugin's authors"
            )
        groups = ctx.param_groups(getattr(cfg, "weight_decay", 0.0))
        arguments = {field: getattr(cfg, field) for field in self.fields}
        if self.computed is not None:
            arguments.update(self.computed(cfg, groups))
        return self.load()(groups, lr=cfg.lr, **arguments)


class _ConfigField(Generic[C]):
    """The entry's ``config`` field: a class, or a :class:`LazyConfig` loaded (and checked) on first read."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.kind = "optimizer" if owner.__name__.startswith("Optimizer") else "scheduler"
        self.base = OptimizerConfig if self.kind == "optimizer" else SchedulerConfig

    def __get__(self, entry: Any, owner: type | None = None) -> type[C]:
        if entry is None:
            raise AttributeError("config")  # no default: the field is required
        value = entry.__dict__["_config"]
        if isinstance(value, LazyConfig):
            loaded = value.load()
            if name_of(loaded, self.base, self.kind) != value.name:
                raise PluginError(
                    f"{self.kind} {value.name!r}: its LazyConfig loaded {loaded.__qualname__}, whose name is "
                    f"{name_of(loaded, self.base, self.kind)!r}; report it to the plugin's authors"
                )
            entry.__dict__["_config"] = value = loaded
        return typing.cast("type[C]", value)

    def __set__(self, entry: Any, value: type[C] | LazyConfig) -> None:
        entry.__dict__["_config"] = value


def _entry_name(entry: Any, base: type, kind: str) -> str:
    """The entry's name, without loading a :class:`LazyConfig`."""
    value = entry.__dict__["_config"]
    if isinstance(value, LazyConfig):
        if not isinstance(value.name, str) or not value.name or not callable(value.load):
            raise PluginError(f"{kind} LazyConfig needs a name and a load() function, got {value!r}")
        return value.name
    return name_of(value, base, kind)


def _aliases(kind: str, name: str, aliases: Sequence[Alias]) -> tuple[Alias, ...]:
    """The entry's aliases as a tuple, each checked: an :class:`Alias`, not the entry's own name, not given twice."""
    aliases = tuple(aliases)
    seen: set[tuple[str, bool]] = set()
    for alias in aliases:
        if not isinstance(alias, Alias):
            raise PluginError(f"{kind} {name!r}: aliases must be optiplug.Alias objects, got {alias!r}")
        if alias.name == name and not alias.transformers:
            raise PluginError(f"{kind} {name!r}: an alias cannot repeat the entry's own name")
        if (alias.name, alias.transformers) in seen:
            raise PluginError(f"{kind} {name!r} declares the alias {alias.name!r} twice")
        seen.add((alias.name, alias.transformers))
    return aliases


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
            ``name`` literal is the registry key. A :class:`LazyConfig` builds it on first use.
        build: ``build(ctx, cfg) -> torch.optim.Optimizer``. Import heavy packages inside it. An
            :class:`OptimizerClass` declares one from the optimizer's class path and config fields.
        summary: one line for ``optiplug list``.
        callbacks: ``callbacks(cfg) -> list[TrainerCallback]`` added to the trainer when this
            optimizer is selected, and only then.
        patches: ``patches(cfg) -> list[Patch]`` applied for the length of ``train()``.
        check: ``check(ctx, cfg)`` raises :class:`ConfigError` when the setup (distributed
            engine, gradient accumulation, adapters, ...) is one this optimizer cannot train.
        requires: distributions the optimizer needs (``"galore-torch"``), for the install hint.
        state_bytes: ``state_bytes(shapes, cfg) -> int``, the optimizer state's size for the trainable
            parameters ``shapes`` (a sequence of :class:`ParamShape`): the bytes of the tensors in
            ``optimizer.state_dict()["state"]``, computed from the shapes (``adam_state_bytes``,
            ``moment_bytes``) or measured without allocating them (the pytorch-optimizer bridge steps
            the real optimizer on ``meta`` tensors). None: ``optiplug estimate`` measures it itself.
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
        aliases: other names for this optimizer, each an :class:`Alias` (a name and preset fields);
            transformers' ``TrainingArguments.optim`` names are aliases with ``transformers=True``.
    """

    config: _ConfigField[C] = _ConfigField()  # a class, or a LazyConfig loaded on first read
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
    aliases: tuple[Alias, ...] = ()

    def __post_init__(self) -> None:
        name = _entry_name(self, OptimizerConfig, "optimizer")
        self.__dict__["_name"] = name
        object.__setattr__(self, "requires", tuple(self.requires))
        object.__setattr__(self, "aliases", _aliases("optimizer", name, self.aliases))

    @property
    def name(self) -> str:
        return str(self.__dict__["_name"])

    def check_requires(self) -> None:
        """Raise :class:`MissingDependencyError` naming the first required package not installed."""
        _check_requires("optimizer", self.name, self.requires)


@dataclass(frozen=True, kw_only=True)
class SchedulerEntry(Generic[C]):
    """One learning-rate scheduler a plugin offers.

    Attributes:
        config: the pydantic config class (a subclass of :class:`SchedulerConfig`), or a :class:`LazyConfig`.
        build: ``build(ctx, cfg) -> LRScheduler``; ``ctx`` is a :class:`ScheduleContext`.
        summary: one line for ``optiplug list``.
        requires: distributions the scheduler needs.
        describe: ``describe(ctx, cfg) -> str``, one line on the schedule a run of
            ``ctx.num_training_steps`` steps gets (WSD: its warmup, stable and decay steps), shown
            in the run header; ``ctx`` is the :class:`ScheduleContext` the factory would get.
        aliases: other names for this scheduler, each an :class:`Alias`; transformers'
            ``lr_scheduler_type`` names are aliases with ``transformers=True``.
        cooldown: ``cooldown(cfg) -> Mapping``, set when a cooldown may branch from a checkpoint of
            this schedule (``cooldown.steps`` with ``training.resume_from_checkpoint``): the decay it
            takes by default, any of ``decay_type``, ``min_lr_ratio`` and ``num_cycles`` (WSD: its own
            decay), or ``{}`` for a schedule without one (``constant``: the cooldown's own). None:
            a cooldown from such a checkpoint is refused.
        check: ``check(ctx, cfg)``, the schedule's compatibility rules for a run of
            ``ctx.num_training_steps`` steps (a warmup not shorter than the run); raise
            :class:`ConfigError` with a sentence. Run when the scheduler is built (by the Trainer,
            ``build_scheduler``, and ``optiplug validate``/``train`` before anything is written, on the
            optimizer built on the model's skeleton, when the run's step count is known in advance).
    """

    config: _ConfigField[C] = _ConfigField()  # a class, or a LazyConfig loaded on first read
    build: Callable[[ScheduleContext, C], Any]
    summary: str = ""
    requires: tuple[str, ...] = ()
    describe: Callable[[ScheduleContext, C], str] | None = None
    aliases: tuple[Alias, ...] = ()
    cooldown: Callable[[C], Mapping[str, Any]] | None = None
    check: Callable[[ScheduleContext, C], None] | None = None

    def __post_init__(self) -> None:
        name = _entry_name(self, SchedulerConfig, "scheduler")
        self.__dict__["_name"] = name
        object.__setattr__(self, "requires", tuple(self.requires))
        object.__setattr__(self, "aliases", _aliases("scheduler", name, self.aliases))

    @property
    def name(self) -> str:
        return str(self.__dict__["_name"])

    def check_requires(self) -> None:
        """Raise :class:`MissingDependencyError` naming the first required package not installed."""
        _check_requires("scheduler", self.name, self.requires)


@dataclass(frozen=True)
class Registered(Generic[E]):
    """A registry row: the entry (an :class:`OptimizerEntry` or a :class:`SchedulerEntry`) and the plugin
    that registered it."""

    kind: Literal["optimizer", "scheduler"]
    entry: E
    plugin: str

    @property
    def name(self) -> str:
        """The entry's canonical name."""
        return self.entry.name
