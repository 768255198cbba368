"""The plugin manager: the default plugin plus entry points of group ``optiplug``, loaded once, lazily.

Environment variables:
    OPTIPLUG_LOAD_PLUGINS: comma-separated allow-list of entry-point plugins (entry-point or
        distribution names); set but empty loads only the default plugin.
    OPTIPLUG_DISABLE_PLUGINS: comma-separated deny-list.

A plugin that fails to import, or implements a hook that does not exist (a misspelling), is
recorded in :func:`plugin_failures` with its name and cause, reported as a warning, and left
out; every other plugin still loads.
"""

from __future__ import annotations

import importlib.metadata
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import pluggy

from optiplug import hookspecs

__all__ = [
    "ENTRY_POINT_GROUP",
    "DEFAULT_PLUGIN",
    "PluginFailure",
    "PluginInfo",
    "get_plugin_manager",
    "plugin_failures",
    "loaded_plugins",
    "register_plugin",
    "unregister_plugin",
    "reload_plugins",
    "plugins_generation",
]

ENTRY_POINT_GROUP = "optiplug"
DEFAULT_PLUGIN = "optiplug"


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that was left out: its name and why."""

    name: str
    cause: str


@dataclass(frozen=True)
class PluginInfo:
    """A loaded plugin: its name, the distribution and version it came from, and the hooks it implements."""

    name: str
    distribution: str | None
    version: str | None
    hooks: tuple[str, ...]


_lock = threading.RLock()
_pm: pluggy.PluginManager | None = None
_failures: list[PluginFailure] = []
_infos: dict[str, PluginInfo] = {}
_generation = 0
_deny_names: dict[str, str] = {}  # plugin name -> the name OPTIPLUG_DISABLE_PLUGINS matches


def _env_list(name: str) -> set[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def _hooks_of(pm: pluggy.PluginManager, plugin: Any) -> tuple[str, ...]:
    return tuple(sorted(caller.name for caller in pm.get_hookcallers(plugin) or ()))


def _register_checked(pm: pluggy.PluginManager, plugin: Any, name: str) -> str | None:
    """Register ``plugin``; on a contract violation, unregister it and return the cause."""
    try:
        pm.register(plugin, name=name)
    except Exception as error:  # pluggy.PluginValidationError, ValueError for a duplicate name
        return f"{type(error).__name__}: {error}"
    unknown = [
        hook.name for hook in pm.get_hookcallers(plugin) or () if hook.spec is None
    ]
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


def _load() -> pluggy.PluginManager:
    from optiplug import builtin

    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    failures: list[PluginFailure] = []
    infos: dict[str, PluginInfo] = {}
    try:
        own_version = importlib.metadata.version("optiplug")
    except importlib.metadata.PackageNotFoundError:
        own_version = None
    for module in builtin.PLUGINS:
        pm.register(module, name=f"{DEFAULT_PLUGIN}:{module.__name__.rsplit('.', 1)[-1]}")
        infos[pm.get_name(module)] = PluginInfo(pm.get_name(module), "optiplug", own_version, _hooks_of(pm, module))

    allow = _env_list("OPTIPLUG_LOAD_PLUGINS")
    deny = _env_list("OPTIPLUG_DISABLE_PLUGINS") or set()
    seen: set[str] = set()
    for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = ep.dist.name if ep.dist is not None else None
        labels = {ep.name} | ({dist} if dist else set())
        if allow is not None and not labels & allow:
            continue
        if labels & deny:
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
        problem = _register_checked(pm, plugin, name)
        if problem:
            failures.append(PluginFailure(name, problem))
            continue
        version = ep.dist.version if ep.dist is not None else None
        infos[name] = PluginInfo(name, dist, version, _hooks_of(pm, plugin))
        _deny_names[name] = ep.name
    for failure in failures:
        warnings.warn(f"optiplug: plugin {failure.name!r} was not loaded: {failure.cause}", RuntimeWarning, stacklevel=3)
    _failures[:] = failures
    _infos.clear()
    _infos.update(infos)
    return pm


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, loading the plugins on first use."""
    global _pm, _generation
    if _pm is None:
        with _lock:
            if _pm is None:
                _pm = _load()
                _generation += 1
    return _pm


def plugins_generation() -> int:
    """A counter that changes whenever the set of plugins changes (registry caches key on it)."""
    get_plugin_manager()
    return _generation


def record_failure(name: str, cause: str) -> None:
    """Record (and warn about) a plugin that broke after loading, e.g. its register hook raised."""
    if any(f.name == name and f.cause == cause for f in _failures):
        return
    _failures.append(PluginFailure(name, cause))
    warnings.warn(f"optiplug: plugin {name!r} was left out: {cause}", RuntimeWarning, stacklevel=3)


def deny_list_name(name: str) -> str | None:
    """The name ``OPTIPLUG_DISABLE_PLUGINS`` matches for plugin ``name`` (None: not an entry-point plugin)."""
    get_plugin_manager()
    return _deny_names.get(name)


def plugin_failures() -> list[PluginFailure]:
    """Plugins that were found but left out, with their causes."""
    get_plugin_manager()
    return list(_failures)


def loaded_plugins() -> list[PluginInfo]:
    """Every loaded plugin, the default plugin's modules first."""
    get_plugin_manager()
    return list(_infos.values())


def register_plugin(plugin: Any, name: str) -> None:
    """Register a plugin object (a module or an instance with ``@hookimpl`` methods) at run time.

    Raises:
        PluginError: the plugin implements an unknown hook or its name is taken.
    """
    from optiplug.errors import PluginError

    global _generation
    pm = get_plugin_manager()
    with _lock:
        problem = _register_checked(pm, plugin, name)
        if problem:
            raise PluginError(f"plugin {name!r} cannot be registered: {problem}")
        _infos[name] = PluginInfo(name, None, None, _hooks_of(pm, plugin))
        _generation += 1


def unregister_plugin(name: str) -> None:
    """Remove a plugin registered under ``name`` (no error if there is none)."""
    global _generation
    pm = get_plugin_manager()
    with _lock:
        if pm.has_plugin(name):
            pm.unregister(name=name)
        _infos.pop(name, None)
        _generation += 1


def reload_plugins() -> None:
    """Forget the loaded plugins; the next lookup loads them again (reads the environment again)."""
    global _pm, _generation
    with _lock:
        _pm = None
        _generation += 1
