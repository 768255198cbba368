"""The registry: one object that owns the plugin manager, the registered entries and the config unions.

Plugins load once, lazily, on first use: the default plugin first (registered by module path,
exactly like an external plugin), then the entry points of group ``optiplug``.

Environment variables:
    OPTIPLUG_LOAD_PLUGINS: comma-separated allow-list of entry-point plugins (entry-point or
        distribution names); set but empty loads only the default plugin.
    OPTIPLUG_DISABLE_PLUGINS: comma-separated deny-list (pluggy's ``set_blocked``).

A plugin that fails to import, implements a hook that does not exist (a misspelling), or whose
``register_*`` hook raises is recorded in :meth:`Registry.failures` with its name and cause,
reported as a warning, and left out; every other plugin still loads. A name registered by two
plugins is unusable (selecting it raises :class:`DuplicateNameError` naming both) while every
other name keeps working.

The registry also owns parsing: :meth:`Registry.parse` turns a name, a mapping or a config
object into the registered config class, through one discriminated union per kind.

Names: an entry's canonical name, and its aliases (:class:`~optiplug.entries.Alias`: a name plus
preset fields). A config's ``name`` is looked up among canonical names first, then aliases;
transformers' ``TrainingArguments.optim`` / ``lr_scheduler_type`` (``transformers=True``) among
the aliases flagged for transformers first. Two plugins giving one name (entry or alias) make that
name unusable, as for entries; a transformers alias may share its name with a canonical entry.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import threading
import typing
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Union

import pluggy
from pydantic import Field, ValidationError

from optiplug import hookspecs
from optiplug.configs import OptimizerConfig, SchedulerConfig, format_validation_error
from optiplug.entries import Alias, OptimizerEntry, Registered, SchedulerEntry
from optiplug.errors import ConfigError, DuplicateNameError, PluginError, UnknownNameError

__all__ = [
    "DEFAULT_PLUGIN",
    "DEFAULT_PLUGIN_MODULES",
    "ENTRY_POINT_GROUP",
    "PluginFailure",
    "PluginInfo",
    "Registry",
    "Resolved",
    "get_entry",
    "get_plugin_manager",
    "get_scheduler_entry",
    "list_optimizers",
    "list_schedulers",
    "loaded_plugins",
    "lookup",
    "optimizer_names",
    "parse_optimizer",
    "parse_scheduler",
    "plugin_failures",
    "register_plugin",
    "registry",
    "reload_plugins",
    "resolve",
    "scheduler_names",
    "unregister_plugin",
]

ENTRY_POINT_GROUP = "optiplug"
DEFAULT_PLUGIN = "optiplug"
DEFAULT_PLUGIN_MODULES = ("optiplug.builtin.optimizers", "optiplug.builtin.schedulers", "optiplug.builtin.transformers")
"""The default plugin, by module path. Each module may name its default entry in ``DEFAULT``."""

KINDS = ("optimizer", "scheduler")
_BASES: dict[str, type[Any]] = {"optimizer": OptimizerConfig, "scheduler": SchedulerConfig}
_ENTRY_TYPES: dict[str, type[Any]] = {"optimizer": OptimizerEntry, "scheduler": SchedulerEntry}


@dataclass(frozen=True)
class PluginFailure:
    """A plugin (or a name it registered) that was left out: its name and why."""

    name: str
    cause: str


@dataclass(frozen=True)
class PluginInfo:
    """A loaded plugin: its name, the distribution and version it came from, and the hooks it implements."""

    name: str
    distribution: str | None
    version: str | None
    hooks: tuple[str, ...]


@dataclass(frozen=True)
class Resolved:
    """What a name selects: the registry row of its entry, and the alias it went through (None: the entry's name)."""

    row: Registered[Any]
    alias: Alias | None = None

    @property
    def preset(self) -> Mapping[str, Any]:
        """The fields the alias sets (empty for the entry's own name)."""
        return self.alias.preset if self.alias is not None else {}


def _kinds_dict() -> dict[str, dict[str, Any]]:
    return {kind: {} for kind in KINDS}


@dataclass
class _Tables:
    """What the register hooks produced, by kind: rows by canonical name, aliases by name (those a config's
    ``name`` reaches, and transformers' names), and names registered twice with the message saying so."""

    rows: dict[str, dict[str, Registered[Any]]] = field(default_factory=_kinds_dict)
    aliases: dict[str, dict[str, Resolved]] = field(default_factory=_kinds_dict)
    transformers: dict[str, dict[str, Resolved]] = field(default_factory=_kinds_dict)
    duplicates: dict[tuple[str, str], str] = field(default_factory=dict)
    transformers_duplicates: dict[tuple[str, str], str] = field(default_factory=dict)


def _env_list(name: str) -> set[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def _plain(value: Any) -> Any:
    """A value as YAML gives it (tuples as lists), to compare a user's value with a preset."""
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _union_of(classes: list[type]) -> Any:
    if len(classes) == 1:
        return classes[0]
    return Annotated[Union[tuple(classes)], Field(discriminator="name")]


class Registry:
    """The plugin manager, the entries it registered, and the config unions built from them.

    One instance, :data:`registry`, serves the process; tests may build their own.
    """

    def __init__(self, group: str = ENTRY_POINT_GROUP, default_modules: tuple[str, ...] = DEFAULT_PLUGIN_MODULES):
        self.group = group
        self.default_modules = default_modules
        self._lock = threading.RLock()
        self._pm: pluggy.PluginManager | None = None
        self._failures: list[PluginFailure] = []
        self._infos: dict[str, PluginInfo] = {}
        self._deny_names: dict[str, str] = {}  # plugin name -> the name OPTIPLUG_DISABLE_PLUGINS matches
        self._defaults: dict[str, str] = {}
        self._tables: _Tables | None = None
        self._unions: dict[str, Any] = {}

    # ---- loading ------------------------------------------------------------------------------
    @property
    def plugin_manager(self) -> pluggy.PluginManager:
        """The pluggy plugin manager, loading the plugins on first use."""
        if self._pm is None:
            with self._lock:
                if self._pm is None:
                    self._pm = self._load()
        return self._pm

    def _load_once(self) -> None:
        """Load the plugins if they are not loaded yet."""
        _ = self.plugin_manager

    def _hooks_of(self, pm: pluggy.PluginManager, plugin: Any) -> tuple[str, ...]:
        return tuple(sorted(caller.name for caller in pm.get_hookcallers(plugin) or ()))

    def _register_checked(self, pm: pluggy.PluginManager, plugin: Any, name: str) -> str | None:
        """Register ``plugin``; on a contract violation, unregister it and return the cause."""
        try:
            pm.register(plugin, name=name)
        except Exception as error:  # pluggy.PluginValidationError, ValueError for a duplicate name
            return f"{type(error).__name__}: {error}"
        unknown = [hook.name for hook in pm.get_hookcallers(plugin) or () if hook.spec is None]
        if unknown:
            pm.unregister(plugin)
            known = ", ".join(sorted(n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "optiplug_spec")))
            return f"implements unknown hook(s) {', '.join(sorted(unknown))} (misspelled?); the hooks are: {known}"
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as error:
            pm.unregister(plugin)
            return str(error)
        return None

    def _load(self) -> pluggy.PluginManager:
        pm = pluggy.PluginManager(self.group)
        pm.add_hookspecs(hookspecs)
        self._failures, self._infos, self._deny_names, self._defaults = [], {}, {}, {}
        self._tables, self._unions = None, {}
        try:
            own_version: str | None = importlib.metadata.version("optiplug")
        except importlib.metadata.PackageNotFoundError:
            own_version = None
        for path in self.default_modules:
            module = importlib.import_module(path)
            name = f"{DEFAULT_PLUGIN}:{path.rsplit('.', 1)[-1]}"
            pm.register(module, name=name)
            self._infos[name] = PluginInfo(name, "optiplug", own_version, self._hooks_of(pm, module))
            for kind, hook in (("optimizer", "register_optimizers"), ("scheduler", "register_schedulers")):
                if getattr(module, "DEFAULT", None) and hasattr(module, hook):
                    self._defaults[kind] = module.DEFAULT

        allow = _env_list("OPTIPLUG_LOAD_PLUGINS")
        for blocked in _env_list("OPTIPLUG_DISABLE_PLUGINS") or ():
            pm.set_blocked(blocked)
        failures: list[PluginFailure] = []
        seen: set[str] = set()
        for ep in sorted(importlib.metadata.entry_points(group=self.group), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else None
            labels = {ep.name} | ({dist} if dist else set())
            if allow is not None and not labels & allow:
                continue
            if any(pm.is_blocked(label) for label in labels):
                continue
            name = dist or ep.name
            if name in seen or pm.has_plugin(name):
                name = f"{name}:{ep.name}"
            if name in seen:  # the same entry point reached twice (e.g. duplicate metadata on sys.path)
                continue
            seen.add(name)
            try:
                plugin = ep.load()
            except Exception as error:
                cause = f"{type(error).__name__}: {error}"
                failures.append(PluginFailure(name, f"failed to import {ep.value!r}: {cause}"))
                continue
            problem = self._register_checked(pm, plugin, name)
            if problem:
                failures.append(PluginFailure(name, problem))
                continue
            version = ep.dist.version if ep.dist is not None else None
            self._infos[name] = PluginInfo(name, dist, version, self._hooks_of(pm, plugin))
            self._deny_names[name] = ep.name
        for failure in failures:
            warnings.warn(
                f"optiplug: plugin {failure.name!r} was not loaded: {failure.cause}", RuntimeWarning, stacklevel=4
            )
        self._failures = failures
        return pm

    def reload(self) -> None:
        """Forget the loaded plugins; the next lookup loads them again (reading the environment again)."""
        with self._lock:
            self._pm = None
            self._tables = None
            self._unions = {}

    def register_plugin(self, plugin: Any, name: str) -> None:
        """Register a plugin object (a module or an instance with ``@hookimpl`` methods) at run time.

        Raises:
            PluginError: the plugin implements an unknown hook or its name is taken.
        """
        pm = self.plugin_manager
        with self._lock:
            problem = self._register_checked(pm, plugin, name)
            if problem:
                raise PluginError(f"plugin {name!r} cannot be registered: {problem}")
            self._infos[name] = PluginInfo(name, None, None, self._hooks_of(pm, plugin))
            self._changed()

    def unregister_plugin(self, name: str) -> None:
        """Remove a plugin registered under ``name`` (no error if there is none)."""
        pm = self.plugin_manager
        with self._lock:
            if pm.has_plugin(name):
                pm.unregister(name=name)
            self._infos.pop(name, None)
            self._failures = [f for f in self._failures if f.name != name]
            self._changed()

    def _changed(self) -> None:
        self._tables = None
        self._unions = {}

    # ---- plugins ------------------------------------------------------------------------------
    def plugins(self) -> list[PluginInfo]:
        """Every loaded plugin, the default plugin's modules first."""
        self._load_once()
        return list(self._infos.values())

    def failures(self) -> list[PluginFailure]:
        """Plugins (or names) left out, with their causes: import failures, broken hooks, duplicates."""
        self._collect()
        return list(self._failures)

    def deny_list_name(self, name: str) -> str | None:
        """The name ``OPTIPLUG_DISABLE_PLUGINS`` matches for plugin ``name`` (None: not an entry-point plugin)."""
        self._load_once()
        return self._deny_names.get(name)

    def _record_failure(self, name: str, cause: str, *, whole_plugin: bool = True) -> None:
        """Record a failure of plugin ``name``: the whole plugin left out, or (a duplicate) one of its names."""
        if any(f.name == name and f.cause == cause for f in self._failures):
            return
        self._failures.append(PluginFailure(name, cause))
        message = f"plugin {name!r} was left out: {cause}" if whole_plugin else cause
        warnings.warn(f"optiplug: {message}", RuntimeWarning, stacklevel=5)

    # ---- entries ------------------------------------------------------------------------------
    def _duplicate_message(self, kind: str, name: str, first: Resolved | Registered[Any], second: Resolved) -> str:
        def who(what: Resolved | Registered[Any]) -> str:
            if isinstance(what, Registered):
                return repr(what.plugin)
            row, alias = what.row, what.alias
            return repr(row.plugin) + (f" (an alias of {row.name!r})" if alias is not None else "")

        plugins = (first.plugin if isinstance(first, Registered) else first.row.plugin, second.row.plugin)
        message = f"{kind} {name!r} is registered twice, by plugins {who(first)} and {who(second)}: uninstall one"
        deny = self.deny_list_name(plugins[1]) or self.deny_list_name(plugins[0])
        return message + (f", or set OPTIPLUG_DISABLE_PLUGINS={deny}" if deny else "")

    def _collect(self) -> _Tables:
        pm = self.plugin_manager
        tables = self._tables
        if tables is not None:
            return tables
        with self._lock:
            tables = _Tables()
            for kind in KINDS:
                hook = getattr(pm.hook, f"register_{kind}s")
                table = tables.rows[kind]
                # Call each implementation on its own so every name is recorded with its plugin, and a
                # plugin whose hook raises is reported and left out while the others still register.
                for impl in hook.get_hookimpls():  # registration order: the default plugin first
                    plugin = pm.get_name(impl.plugin) or repr(impl.plugin)
                    scratch: dict[str, Registered[Any]] = {}
                    try:
                        impl.function(register=self._make_register(kind, scratch, plugin))
                    except Exception as error:  # a broken plugin must not break every command
                        self._record_failure(plugin, f"register_{kind}s raised {type(error).__name__}: {error}")
                        continue
                    for name, row in scratch.items():
                        if (kind, name) in tables.duplicates:
                            continue
                        if name in table:
                            message = self._duplicate_message(kind, name, table.pop(name), Resolved(row))
                            tables.duplicates[(kind, name)] = message
                            self._record_failure(plugin, message, whole_plugin=False)
                            continue
                        table[name] = row
                self._collect_aliases(kind, tables)
            self._tables = tables
        return tables

    def _collect_aliases(self, kind: str, tables: _Tables) -> None:
        """Add the aliases of every registered ``kind`` entry (after all entries: a canonical name comes first)."""
        rows, reachable, transformers = tables.rows[kind], tables.aliases[kind], tables.transformers[kind]
        for row in list(rows.values()):
            for alias in row.entry.aliases:
                found = Resolved(row, alias)
                if alias.transformers:
                    self._add_alias(kind, transformers, tables.transformers_duplicates, found)
                    if alias.name in rows or (kind, alias.name) in tables.duplicates:
                        continue  # a config's name means the canonical entry; transformers' name means this
                if alias.name in rows:
                    canonical = rows.pop(alias.name)
                    message = self._duplicate_message(kind, alias.name, canonical, found)
                    tables.duplicates[(kind, alias.name)] = message
                    self._record_failure(row.plugin, message, whole_plugin=False)
                    continue
                self._add_alias(kind, reachable, tables.duplicates, found)

    def _add_alias(self, kind: str, into: dict[str, Resolved], duplicates: dict[tuple[str, str], str], found: Resolved):
        name = found.alias.name if found.alias is not None else found.row.name
        if (kind, name) in duplicates:
            return
        earlier = into.get(name)
        if earlier is not None and earlier.row is found.row and earlier.preset == found.preset:
            return  # the same entry and preset under one name twice (a transformers alias a config also reaches)
        if earlier is not None:
            del into[name]
            message = self._duplicate_message(kind, name, earlier, found)
            duplicates[(kind, name)] = message
            self._record_failure(found.row.plugin, message, whole_plugin=False)
            return
        into[name] = found

    def _make_register(self, kind: str, scratch: dict[str, Registered[Any]], plugin: str) -> Callable[[Any], None]:
        entry_type = _ENTRY_TYPES[kind]
        given: dict[bool, set[str]] = {False: set(), True: set()}  # names this plugin gave: config's, transformers'

        def register(entry: Any) -> None:
            if not isinstance(entry, entry_type):
                raise PluginError(
                    f"plugin {plugin!r} registered {entry!r} as a {kind}; expected optiplug.{entry_type.__name__}"
                )
            names = [(entry.name, False)] + [(alias.name, alias.transformers) for alias in entry.aliases]
            for name, transformers in names:
                if name in given[transformers]:
                    raise DuplicateNameError(f"plugin {plugin!r} registered the {kind} {name!r} twice")
                given[transformers].add(name)
            scratch[entry.name] = Registered(typing.cast(Any, kind), entry, plugin)

        return register

    def rows(self, kind: str) -> list[Registered[Any]]:
        """Every registered entry of ``kind`` (``"optimizer"`` or ``"scheduler"``), sorted by name."""
        return [row for _, row in sorted(self._collect().rows[kind].items())]

    def names(self, kind: str) -> list[str]:
        """The canonical names of ``kind``, sorted."""
        return sorted(self._collect().rows[kind])

    def aliases(self, kind: str) -> dict[str, Resolved]:
        """The aliases a config's ``name`` can select, by name (an alias shadowed by a canonical name is not here)."""
        return dict(sorted(self._collect().aliases[kind].items()))

    def lookup(self, kind: str, name: str) -> Registered[Any]:
        """The registry row ``name`` selects in a config: the entry of that name, or of that alias.

        Raises:
            UnknownNameError: no plugin registered ``name`` (the message suggests close names).
            DuplicateNameError: two plugins registered ``name``.
        """
        return self.resolve(kind, name).row

    def resolve(self, kind: str, name: str, *, transformers: bool = False) -> Resolved:
        """What ``name`` selects: the entry's row, and the alias (with its preset fields) it goes through.

        Args:
            kind: ``"optimizer"`` or ``"scheduler"``.
            name: a canonical name or an alias.
            transformers: ``name`` is transformers' ``TrainingArguments.optim`` (or ``lr_scheduler_type``):
                the aliases flagged ``transformers=True`` are looked at first, then the config names.

        Raises:
            UnknownNameError, DuplicateNameError.
        """
        tables = self._collect()
        if not isinstance(name, str):
            raise UnknownNameError(kind, name, tables.rows[kind])
        if transformers:
            found = tables.transformers[kind].get(name)
            if found is not None:
                return found
            message = tables.transformers_duplicates.get((kind, name))
            if message:
                raise DuplicateNameError(message)
        row = tables.rows[kind].get(name)
        if row is not None:
            return Resolved(row)
        found = tables.aliases[kind].get(name)
        if found is not None:
            return found
        message = tables.duplicates.get((kind, name))
        if message:
            raise DuplicateNameError(message)
        raise UnknownNameError(kind, name, tables.rows[kind], also=tables.aliases[kind])

    def default_name(self, kind: str) -> str:
        """The default plugin's default ``kind`` (what a section without a name selects)."""
        self._load_once()
        try:
            return self._defaults[kind]
        except KeyError:
            raise PluginError(f"the default plugin names no default {kind}") from None

    # ---- parsing ------------------------------------------------------------------------------
    def union(self, kind: str) -> Any:
        """``Annotated[Union[...], Field(discriminator="name")]`` of every registered config of ``kind`` (cached)."""
        union = self._unions.get(kind)
        if union is None:
            union = self._unions[kind] = _union_of([row.entry.config for row in self.rows(kind)])
        return union

    def parse(
        self, kind: str, value: Any, fields: Mapping[str, Any] | None = None, *, transformers: bool = False
    ) -> Any:
        """Validate ``value`` (a registered name or alias, a mapping with ``name``, a config object, or None for
        the default) with ``fields`` on top, into the registered config class.

        An alias selects its entry with the alias's preset fields; the parsed config carries the entry's
        canonical name. ``transformers=True`` reads the name as transformers' (see :meth:`resolve`).

        Raises:
            UnknownNameError, DuplicateNameError, ConfigError (one line per invalid field; a value that
            contradicts an alias's preset).
        """
        base = _BASES[kind]
        if isinstance(value, base) and not fields:
            self.lookup(kind, value.name)  # a config object must still name a registered entry
            return value
        if isinstance(value, base):  # only the fields it was given: validators may ask which ones (min_lr or rate)
            value = {**value.model_dump(exclude_unset=True), "name": value.name}
        elif isinstance(value, str):
            value = {"name": value}
        elif value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{kind}: expected a mapping with a 'name' key or a name, got {type(value).__name__}")
        value = {**value, **(fields or {})}
        if "name" not in value:  # a section without a name configures the default entry
            value["name"] = self.default_name(kind)
        found = self.resolve(kind, value["name"], transformers=transformers)
        if found.alias is not None:
            value = self._with_preset(kind, found, value)
        return self.validate(kind, value)

    def _with_preset(self, kind: str, found: Resolved, value: Mapping[str, Any]) -> dict[str, Any]:
        """``value`` with the alias's preset fields and the canonical name (a contradicting value is an error)."""
        alias, row = found.alias, found.row
        assert alias is not None
        fields = row.entry.config.model_fields
        unknown = sorted(key for key in alias.preset if key not in fields)
        if unknown:
            raise PluginError(
                f"{kind} alias {alias.name!r} (plugin {row.plugin!r}) presets {', '.join(unknown)}, which "
                f"{row.name!r} does not have; report it to the plugin's authors"
            )
        for key, preset in alias.preset.items():
            if key in value and _plain(value[key]) != _plain(preset):
                raise ConfigError(
                    f"{kind}.{key}: {alias.name!r} is {row.name!r} with {key}={preset!r}, but {key}={value[key]!r} "
                    f"is given: drop {key}, or select {row.name!r} with {key}={value[key]!r}"
                )
        return {**alias.preset, **value, "name": row.name}

    def validate(self, kind: str, value: Mapping[str, Any]) -> Any:
        """Validate a mapping with a registered ``name`` into that entry's config class (the one place that does).

        Raises:
            UnknownNameError, DuplicateNameError, ConfigError (one line per invalid field).
        """
        # The discriminator selects exactly this class: validating with it alone skips building the whole union.
        config = self.lookup(kind, value["name"]).entry.config
        try:
            return config.model_validate(value)
        except ValidationError as error:
            raise ConfigError(format_validation_error(error, kind)) from None


registry = Registry()
"""The process-wide registry."""


# ---- the module-level API: the registry's methods, as plugin authors and the app call them ------


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, loading the plugins on first use."""
    return registry.plugin_manager


def list_optimizers() -> list[Registered[OptimizerEntry[Any]]]:
    """Every registered optimizer, sorted by name."""
    return registry.rows("optimizer")


def list_schedulers() -> list[Registered[SchedulerEntry[Any]]]:
    """Every registered scheduler, sorted by name."""
    return registry.rows("scheduler")


def optimizer_names() -> list[str]:
    return registry.names("optimizer")


def scheduler_names() -> list[str]:
    return registry.names("scheduler")


def lookup(kind: str, name: str) -> Registered[Any]:
    """The registry row for ``name``; ``kind`` is ``"optimizer"`` or ``"scheduler"``."""
    return registry.lookup(kind, name)


def resolve(kind: str, name: str, *, transformers: bool = False) -> Resolved:
    """What ``name`` selects (the entry's row and the alias it goes through): see :meth:`Registry.resolve`.

    ``resolve("optimizer", args.optim, transformers=True)`` answers which entry and preset fields
    transformers' ``TrainingArguments.optim`` value means.
    """
    return registry.resolve(kind, name, transformers=transformers)


def get_entry(name: str) -> OptimizerEntry:
    """The :class:`OptimizerEntry` registered as ``name``.

    Raises:
        UnknownNameError: no plugin registered ``name`` (the message suggests close names).
    """
    return registry.lookup("optimizer", name).entry


def get_scheduler_entry(name: str) -> SchedulerEntry:
    """The :class:`SchedulerEntry` registered as ``name``."""
    return registry.lookup("scheduler", name).entry


def parse_optimizer(value: Any, **fields: Any) -> OptimizerConfig:
    """Validate ``value`` (a name, a mapping with ``name``, a config object or None) into its optimizer config."""
    return registry.parse("optimizer", value, fields)


def parse_scheduler(value: Any, **fields: Any) -> SchedulerConfig:
    """Validate ``value`` (a name, a mapping with ``name``, a config object or None) into its scheduler config."""
    return registry.parse("scheduler", value, fields)


def plugin_failures() -> list[PluginFailure]:
    """Plugins (or names) that were left out, with their causes."""
    return registry.failures()


def loaded_plugins() -> list[PluginInfo]:
    """Every loaded plugin, the default plugin's modules first."""
    return registry.plugins()


def register_plugin(plugin: Any, name: str) -> None:
    """Register a plugin object at run time (see :meth:`Registry.register_plugin`)."""
    registry.register_plugin(plugin, name)


def unregister_plugin(name: str) -> None:
    """Remove a plugin registered under ``name`` (no error if there is none)."""
    registry.unregister_plugin(name)


def reload_plugins() -> None:
    """Forget the loaded plugins; the next lookup loads them again (reads the environment again)."""
    registry.reload()
