"""The entry tables: what the plugins' ``register_*`` hooks give, by kind and name, and the names given twice.

:func:`collect` calls each plugin's ``register_optimizers`` and ``register_schedulers`` through pluggy
(a ``wrapper=True`` implementation wraps its own plugin's implementation; plugins are called in pluggy's
order, so ``tryfirst``/``trylast`` hold), one plugin at a time so that every name is recorded with the
plugin that gave it. A plugin whose hook raises is left out: none of its names, and it is unregistered,
so none of its other hooks (``trainer_callbacks``) run either.

Names: an entry's canonical name, and its aliases (:class:`~optiplug.entries.Alias`: a name plus preset
fields). A config's ``name`` is looked up among canonical names first, then aliases; transformers'
``TrainingArguments.optim`` / ``lr_scheduler_type`` (``transformers=True``) among the aliases flagged for
transformers first. Two plugins giving one name (entry or alias) make that name unusable (selecting it
raises :class:`DuplicateNameError` naming both) while every other name keeps working; a transformers alias
may share its name with a canonical entry.

A :class:`Tables` is a snapshot: built once, then only read, so readers need no lock.
"""

from __future__ import annotations

import typing
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from optiplug.entries import Alias, OptimizerEntry, Registered, SchedulerEntry
from optiplug.errors import DuplicateNameError, PluginError, UnknownNameError
from optiplug.plugins import PluginFailure, Plugins

KINDS = ("optimizer", "scheduler")
_ENTRY_TYPES: dict[str, type[Any]] = {"optimizer": OptimizerEntry, "scheduler": SchedulerEntry}


@dataclass(frozen=True)
class Resolved:
    """What a name selects: the registry row of its entry, and the alias it went through (None: the entry's name)."""

    row: Registered[Any]
    alias: Alias | None = None

    @property
    def preset(self) -> Mapping[str, Any]:
        """The fields the alias sets (empty for the entry's own name)."""
        return self.alias.preset if self.alias is not None else {}


def _by_kind() -> dict[str, dict[str, Any]]:
    return {kind: {} for kind in KINDS}


@dataclass(frozen=True)
class Tables:
    """By kind: rows by canonical name, aliases by name (those a config's ``name`` reaches, and transformers'
    names), the messages of names given twice, and the duplicates as plugin failures."""

    rows: dict[str, dict[str, Registered[Any]]] = field(default_factory=_by_kind)
    aliases: dict[str, dict[str, Resolved]] = field(default_factory=_by_kind)
    transformers: dict[str, dict[str, Resolved]] = field(default_factory=_by_kind)
    duplicates: dict[tuple[str, str], str] = field(default_factory=dict)
    transformers_duplicates: dict[tuple[str, str], str] = field(default_factory=dict)
    failures: list[PluginFailure] = field(default_factory=list)

    def resolve(self, kind: str, name: str, *, transformers: bool = False) -> Resolved:
        """What ``name`` selects (see :meth:`optiplug.registry.Registry.resolve`).

        Raises:
            UnknownNameError, DuplicateNameError.
        """
        if not isinstance(name, str):
            raise UnknownNameError(kind, name, self.rows[kind])
        if transformers:
            found = self.transformers[kind].get(name)
            if found is not None:
                return found
            message = self.transformers_duplicates.get((kind, name))
            if message:
                raise DuplicateNameError(message)
        row = self.rows[kind].get(name)
        if row is not None:
            return Resolved(row)
        found = self.aliases[kind].get(name)
        if found is not None:
            return found
        message = self.duplicates.get((kind, name))
        if message:
            raise DuplicateNameError(message)
        raise UnknownNameError(kind, name, self.rows[kind], also=self.aliases[kind])


def _register_into(kind: str, scratch: dict[str, Registered[Any]], plugin: str) -> Callable[[Any], None]:
    """The ``register`` callable handed to one plugin's ``register_<kind>s`` hook."""
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


def _called(plugins: Plugins) -> dict[str, dict[str, dict[str, Registered[Any]]]]:
    """Each plugin's rows by kind, from its hooks called through pluggy; a plugin whose hook raises is left out."""
    pm = plugins.pm
    given: dict[str, dict[str, dict[str, Registered[Any]]]] = {}
    broken: dict[str, str] = {}
    for kind in KINDS:
        hook_name = f"register_{kind}s"
        hook = getattr(pm.hook, hook_name)
        order: list[Any] = []
        for impl in reversed(hook.get_hookimpls()):  # pluggy's call order: tryfirst first, trylast last
            if impl.plugin not in order:
                order.append(impl.plugin)
        for plugin in order:
            name = pm.get_name(plugin) or repr(plugin)
            if name in broken:
                continue
            scratch = given.setdefault(name, _by_kind())[kind]
            caller = pm.subset_hook_caller(hook_name, remove_plugins=[p for p in order if p is not plugin])
            try:
                caller(register=_register_into(kind, scratch, name))
            except Exception as error:  # a broken plugin must not break every command
                broken[name] = f"{hook_name} raised {type(error).__name__}: {error}"
    for name, cause in broken.items():
        given.pop(name, None)
        plugins.leave_out(name, cause)
    return given


def collect(plugins: Plugins, warned: list[PluginFailure] | None = None) -> Tables:
    """Call the register hooks and build the tables; a duplicate not in ``warned`` is reported with a warning."""
    given = _called(plugins)
    registration_order = [name for name, _ in plugins.pm.list_name_plugin() if name in given]
    tables = Tables()
    collector = _Collector(tables, plugins, warned or [])
    for kind in KINDS:
        table = tables.rows[kind]
        for plugin in registration_order:  # merged in registration order: the default plugin first
            for name, row in given[plugin][kind].items():
                if (kind, name) in tables.duplicates:
                    continue
                if name in table:
                    collector.duplicate(kind, name, table.pop(name), Resolved(row), tables.duplicates)
                    continue
                table[name] = row
        collector.aliases(kind)
    return tables


@dataclass
class _Collector:
    tables: Tables
    plugins: Plugins
    warned: list[PluginFailure]

    def duplicate(
        self, kind: str, name: str, first: Resolved | Registered[Any], second: Resolved, into: dict[Any, str]
    ) -> None:
        """Record that ``name`` was given twice: unusable, with a message naming both plugins."""

        def who(what: Resolved | Registered[Any]) -> str:
            if isinstance(what, Registered):
                return repr(what.plugin)
            return repr(what.row.plugin) + (f" (an alias of {what.row.name!r})" if what.alias is not None else "")

        plugins = (first.plugin if isinstance(first, Registered) else first.row.plugin, second.row.plugin)
        message = f"{kind} {name!r} is registered twice, by plugins {who(first)} and {who(second)}: uninstall one"
        deny = self.plugins.deny_list_name(plugins[1]) or self.plugins.deny_list_name(plugins[0])
        message += f", or set OPTIPLUG_DISABLE_PLUGINS={deny}" if deny else ""
        into[(kind, name)] = message
        failure = PluginFailure(second.row.plugin, message)
        if failure not in self.tables.failures:
            self.tables.failures.append(failure)
            if failure not in self.warned:
                warnings.warn(f"optiplug: {message}", RuntimeWarning, stacklevel=6)

    def aliases(self, kind: str) -> None:
        """Add the aliases of every registered ``kind`` entry (after all entries: a canonical name comes first)."""
        tables = self.tables
        rows, reachable, transformers = tables.rows[kind], tables.aliases[kind], tables.transformers[kind]
        for row in list(rows.values()):
            for alias in row.entry.aliases:
                found = Resolved(row, alias)
                if alias.transformers:
                    self._add_alias(kind, transformers, tables.transformers_duplicates, found)
                    if alias.name in rows or (kind, alias.name) in tables.duplicates:
                        continue  # a config's name means the canonical entry; transformers' name means this
                if alias.name in rows:
                    self.duplicate(kind, alias.name, rows.pop(alias.name), found, tables.duplicates)
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
            self.duplicate(kind, name, earlier, found, duplicates)
            return
        into[name] = found
