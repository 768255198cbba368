"""The registry: the loaded plugins, the entry tables built from their hooks, and parsing, behind one object.

Three small modules do the work, one job each: :mod:`optiplug.plugins` loads the plugins into pluggy's
plugin manager (the default plugin by module path, through the same checked registration as an entry
point's), :mod:`optiplug.tables` calls their ``register_*`` hooks through pluggy and keeps the names, aliases
and duplicates, and :mod:`optiplug.parsing` turns a section into its registered config. :class:`Registry`
loads once, lazily, on first use, keeps one immutable snapshot of the tables (rebuilt when a plugin is
registered or unregistered at run time), and the module-level functions below are its methods as plugin
authors and the app call them.

A plugin that fails to import, implements a hook that does not exist, or whose ``register_*`` hook raises
is recorded in :meth:`Registry.failures` with its name and cause, reported as a warning, and left out
(none of its names and none of its hooks); every other plugin still loads. A name registered by two plugins
is unusable (selecting it raises :class:`DuplicateNameError` naming both) while every other name keeps
working.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import pluggy

from optiplug import parsing, plugins, tables
from optiplug.configs import OptimizerConfig, SchedulerConfig
from optiplug.entries import OptimizerEntry, Registered, SchedulerEntry
from optiplug.errors import PluginError, UnknownNameError
from optiplug.plugins import DEFAULT_PLUGIN, DEFAULT_PLUGIN_MODULES, ENTRY_POINT_GROUP, PluginFailure, PluginInfo
from optiplug.tables import KINDS, Resolved

__all__ = [
    "DEFAULT_PLUGIN",
    "DEFAULT_PLUGIN_MODULES",
    "ENTRY_POINT_GROUP",
    "KINDS",
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


class Registry:
    """The loaded plugins, the snapshot of their entries, and the config unions built from them.

    One instance, :data:`registry`, serves the process; tests may build their own. Loading and rebuilding
    the snapshot happen under a lock; readers take the current snapshot, which is never changed after it is
    published.
    """

    def __init__(self, group: str = ENTRY_POINT_GROUP, default_modules: tuple[str, ...] = DEFAULT_PLUGIN_MODULES):
        self.group = group
        self.default_modules = default_modules
        self._lock = threading.RLock()
        self._plugins: plugins.Plugins | None = None
        self._tables: tables.Tables | None = None
        self._last: tables.Tables | None = None  # the snapshot before a rebuild: its duplicates are not warned again
        self._unions: tuple[tables.Tables, dict[str, Any]] | None = None

    # ---- the plugins --------------------------------------------------------------------------
    def _loaded(self) -> plugins.Plugins:
        loaded = self._plugins
        if loaded is None:
            with self._lock:
                if self._plugins is None:
                    self._plugins = plugins.load(self.group, self.default_modules)
                loaded = self._plugins
        return loaded

    @property
    def plugin_manager(self) -> pluggy.PluginManager:
        """The pluggy plugin manager, loading the plugins on first use."""
        return self._loaded().pm

    def reload(self) -> None:
        """Forget the loaded plugins; the next lookup loads them again (reading the environment again)."""
        with self._lock:
            self._plugins = None
            self._tables = None

    def register_plugin(self, plugin: Any, name: str) -> None:
        """Register a plugin object (a module or an instance with ``@hookimpl`` methods) at run time.

        Raises:
            PluginError: the plugin implements an unknown hook or its name is taken.
        """
        with self._lock:
            problem = self._loaded().add(plugin, name)
            if problem:
                raise PluginError(f"plugin {name!r} cannot be registered: {problem}")
            self._tables = None

    def unregister_plugin(self, name: str) -> None:
        """Remove a plugin registered under ``name`` (no error if there is none)."""
        with self._lock:
            self._loaded().remove(name)
            self._tables = None

    def plugins(self) -> list[PluginInfo]:
        """Every loaded plugin, the default plugin's modules first."""
        return self._loaded().infos()

    def failures(self) -> list[PluginFailure]:
        """Plugins (or names) left out, with their causes: import failures, broken hooks, duplicates."""
        snapshot = self._snapshot()
        return self._loaded().failures() + list(snapshot.failures)

    def deny_list_name(self, name: str) -> str | None:
        """The name ``OPTIPLUG_DISABLE_PLUGINS`` matches for plugin ``name`` (None: not an entry-point plugin)."""
        return self._loaded().deny_list_name(name)

    # ---- the entries --------------------------------------------------------------------------
    def _snapshot(self) -> tables.Tables:
        snapshot = self._tables
        if snapshot is None:
            with self._lock:
                if self._tables is None:
                    earlier = self._last.failures if self._last is not None else []
                    self._tables = self._last = tables.collect(self._loaded(), earlier)
                snapshot = self._tables
        return snapshot

    def rows(self, kind: str) -> list[Registered[Any]]:
        """Every registered entry of ``kind`` (``"optimizer"`` or ``"scheduler"``), sorted by name."""
        return [row for _, row in sorted(self._snapshot().rows[kind].items())]

    def names(self, kind: str) -> list[str]:
        """The canonical names of ``kind``, sorted."""
        return sorted(self._snapshot().rows[kind])

    def aliases(self, kind: str) -> dict[str, Resolved]:
        """The aliases a config's ``name`` can select, by name (an alias shadowed by a canonical name is not here)."""
        return dict(sorted(self._snapshot().aliases[kind].items()))

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
        with self._explained(kind):
            return self._snapshot().resolve(kind, name, transformers=transformers)

    def left_out_note(self) -> str:
        """For an unknown name: the plugins OPTIPLUG_DISABLE_PLUGINS or OPTIPLUG_LOAD_PLUGINS left out ("": none)."""
        left_out = self._loaded().left_out
        if not left_out:
            return ""
        by_variable: dict[str, list[str]] = {}
        for plugin, variable in sorted(left_out.items()):
            by_variable.setdefault(variable, []).append(plugin)
        why = "; ".join(
            f"{variable} left out plugin{'s' if len(names) > 1 else ''} {', '.join(names)}"
            for variable, names in by_variable.items()
        )
        return f"{why}, which may register it: change that variable to load {'it' if len(left_out) == 1 else 'them'}"

    @contextlib.contextmanager
    def _explained(self, kind: str) -> Iterator[None]:
        """An unknown name says which plugins OPTIPLUG_DISABLE_PLUGINS or OPTIPLUG_LOAD_PLUGINS left out."""
        try:
            yield
        except UnknownNameError as error:
            note = self.left_out_note()
            if not note:
                raise
            also = self._snapshot().aliases[kind]
            raise UnknownNameError(error.kind, error.name, error.registered, also=also, note=note) from None

    def default_name(self, kind: str) -> str:
        """The default plugin's default ``kind`` (what a section without a name selects): the ``DEFAULT`` of
        the default plugin's module that implements ``register_<kind>s``."""
        pm = self.plugin_manager
        for path in self.default_modules:
            module = pm.get_plugin(f"{DEFAULT_PLUGIN}:{path.rsplit('.', 1)[-1]}")
            default = getattr(module, "DEFAULT", None)
            if default and hasattr(module, f"register_{kind}s"):
                return str(default)
        raise PluginError(f"the default plugin names no default {kind}")

    # ---- parsing ------------------------------------------------------------------------------
    def union(self, kind: str) -> Any:
        """``Annotated[Union[...], Field(discriminator="name")]`` of every registered config of ``kind`` (cached
        per snapshot)."""
        snapshot = self._snapshot()
        cached = self._unions
        if cached is None or cached[0] is not snapshot:
            cached = self._unions = (snapshot, {})
        union = cached[1].get(kind)
        if union is None:
            union = cached[1][kind] = parsing.union_of([row.entry.config for row in self.rows(kind)])
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
        with self._explained(kind):
            return parsing.parse(
                self._snapshot(),
                kind,
                value,
                fields,
                default=lambda: self.default_name(kind),
                transformers=transformers,
            )

    def validate(self, kind: str, value: Mapping[str, Any]) -> Any:
        """Validate a mapping with a registered ``name`` into that entry's config class (the one place that does).

        Raises:
            UnknownNameError, DuplicateNameError, ConfigError (one line per invalid field).
        """
        return parsing.validate(self._snapshot(), kind, value)


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
