"""Loading plugins into one pluggy plugin manager: the default plugin's modules, then the entry points of group
``optiplug``, each through the same checked registration.

Environment variables:
    OPTIPLUG_LOAD_PLUGINS: comma-separated allow-list of entry-point plugins (entry-point or distribution
        names); set but empty loads only the default plugin.
    OPTIPLUG_DISABLE_PLUGINS: comma-separated deny-list (pluggy's ``set_blocked``).

A plugin that fails to import or implements a hook that does not exist (a misspelling) is recorded as a
:class:`PluginFailure`, reported as a warning and not registered; every other plugin still loads.

Which plugins are loaded and which hooks they implement is pluggy's own bookkeeping; :class:`Plugins` adds
only what pluggy cannot know on this path: the distribution each came from, and the failures.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import pluggy

from optiplug import hookspecs

ENTRY_POINT_GROUP = "optiplug"
DEFAULT_PLUGIN = "optiplug"
DEFAULT_PLUGIN_MODULES = ("optiplug.builtin.optimizers", "optiplug.builtin.schedulers", "optiplug.builtin.transformers")
"""The default plugin, by module path. Each module may name its default entry in ``DEFAULT``."""


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
class _Source:
    """Where a plugin came from: its distribution and version, and the name the deny-list matches."""

    distribution: str | None = None
    version: str | None = None
    deny_name: str | None = None


def _env_list(name: str) -> set[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def _known_hooks() -> str:
    return ", ".join(sorted(n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "optiplug_spec")))


class Plugins:
    """A pluggy plugin manager with the plugins that loaded, and the plugins that were left out."""

    def __init__(self, group: str = ENTRY_POINT_GROUP):
        self.pm = pluggy.PluginManager(group)
        self.pm.add_hookspecs(hookspecs)
        self._sources: dict[str, _Source] = {}
        self._failures: list[PluginFailure] = []
        self.left_out: dict[str, str] = {}  # plugin -> the environment variable (and value) that left it out

    def add(
        self,
        plugin: Any,
        name: str,
        *,
        distribution: str | None = None,
        version: str | None = None,
        deny_name: str | None = None,
    ) -> str | None:
        """Register ``plugin`` as ``name``; on a contract violation, register nothing and return the cause."""
        try:
            self.pm.register(plugin, name=name)
        except Exception as error:  # pluggy.PluginValidationError, ValueError for a name already taken
            return f"{type(error).__name__}: {error}"
        unknown = [hook.name for hook in self.pm.get_hookcallers(plugin) or () if hook.spec is None]
        if unknown:
            self.pm.unregister(plugin)
            hooks = ", ".join(sorted(unknown))
            return f"implements unknown hook(s) {hooks} (misspelled?); the hooks are: {_known_hooks()}"
        self._sources[name] = _Source(distribution, version, deny_name)
        return None

    def remove(self, name: str) -> None:
        """Unregister plugin ``name`` and forget its failures (no error if there is none)."""
        if self.pm.has_plugin(name):
            self.pm.unregister(name=name)
        self._sources.pop(name, None)
        self._failures = [failure for failure in self._failures if failure.name != name]

    def leave_out(self, name: str, cause: str) -> None:
        """Unregister plugin ``name`` entirely (every hook of it) and record why, with a warning."""
        if self.pm.has_plugin(name):
            self.pm.unregister(name=name)
        self._sources.pop(name, None)
        self.fail(name, cause, "was left out")

    def fail(self, name: str, cause: str, what: str = "was not loaded") -> None:
        self._failures.append(PluginFailure(name, cause))
        warnings.warn(f"optiplug: plugin {name!r} {what}: {cause}", RuntimeWarning, stacklevel=5)

    def infos(self) -> list[PluginInfo]:
        """Every registered plugin, in registration order (the default plugin's modules first)."""
        infos = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:  # a blocked name
                continue
            source = self._sources.get(name, _Source())
            hooks = tuple(sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or ()))
            infos.append(PluginInfo(name, source.distribution, source.version, hooks))
        return infos

    def failures(self) -> list[PluginFailure]:
        return list(self._failures)

    def deny_list_name(self, name: str) -> str | None:
        """The name ``OPTIPLUG_DISABLE_PLUGINS`` matches for plugin ``name`` (None: not an entry-point plugin)."""
        source = self._sources.get(name)
        return source.deny_name if source is not None else None


def load(group: str = ENTRY_POINT_GROUP, default_modules: tuple[str, ...] = DEFAULT_PLUGIN_MODULES) -> Plugins:
    """The default plugin's modules and every allowed, unblocked entry point of ``group``, registered."""
    plugins = Plugins(group)
    try:
        own_version: str | None = importlib.metadata.version("optiplug")
    except importlib.metadata.PackageNotFoundError:
        own_version = None
    for path in default_modules:
        name = f"{DEFAULT_PLUGIN}:{path.rsplit('.', 1)[-1]}"
        problem = plugins.add(importlib.import_module(path), name, distribution="optiplug", version=own_version)
        if problem:  # the default plugin breaking its own contract is a bug in optiplug, not a user's plugin
            raise RuntimeError(f"optiplug's default plugin {name!r} is broken: {problem}")

    allow = _env_list("OPTIPLUG_LOAD_PLUGINS")
    deny = _env_list("OPTIPLUG_DISABLE_PLUGINS") or set()
    for blocked in deny:
        plugins.pm.set_blocked(blocked)
    seen: set[str] = set()
    points = _entry_points(group)
    _warn_unknown_names(points, allow, deny)
    for ep, dist, version in points:
        labels = {ep.name} | ({dist} if dist else set())
        if allow is not None and not labels & allow:
            plugins.left_out[dist or ep.name] = f"OPTIPLUG_LOAD_PLUGINS={os.environ['OPTIPLUG_LOAD_PLUGINS']}"
            continue
        if any(plugins.pm.is_blocked(label) for label in labels):
            plugins.left_out[dist or ep.name] = f"OPTIPLUG_DISABLE_PLUGINS={os.environ['OPTIPLUG_DISABLE_PLUGINS']}"
            continue
        name = dist or ep.name
        if name in seen or plugins.pm.has_plugin(name):
            name = f"{name}:{ep.name}"
        if name in seen:  # the same entry point reached twice (e.g. duplicate metadata on sys.path)
            continue
        seen.add(name)
        try:
            plugin = ep.load()
        except Exception as error:
            plugins.fail(name, f"failed to import {ep.value!r}: {type(error).__name__}: {error}")
            continue
        problem = plugins.add(plugin, name, distribution=dist, version=version, deny_name=ep.name)
        if problem:
            plugins.fail(name, problem)
    return plugins


class _Point(NamedTuple):
    """An entry point and the name and version of the distribution it came from (None: no distribution)."""

    entry: importlib.metadata.EntryPoint
    dist: str | None
    version: str | None


def _entry_points(group: str) -> list[_Point]:
    """The entry points of ``group``, by name. Each distribution's metadata file is parsed once, here (``dist.name``
    and ``dist.version`` parse it again at every read)."""
    points = []
    for ep in sorted(importlib.metadata.entry_points(group=group), key=lambda e: e.name):
        if ep.dist is None:
            points.append(_Point(ep, None, None))
        else:
            metadata = ep.dist.metadata
            points.append(_Point(ep, metadata["Name"], metadata["Version"]))
    return points


def _warn_unknown_names(points: list[_Point], allow: set[str] | None, deny: set[str]) -> None:
    """One warning per variable naming plugins that are not installed (a typo would otherwise do nothing)."""
    labels = {ep.name for ep, _, _ in points} | {dist for _, dist, _ in points if dist is not None}
    for variable, names in (("OPTIPLUG_LOAD_PLUGINS", allow or set()), ("OPTIPLUG_DISABLE_PLUGINS", deny)):
        unknown = sorted(names - labels)
        if unknown:
            warnings.warn(
                f"optiplug: {variable} names no installed plugin {', '.join(repr(n) for n in unknown)} "
                f"(installed: {', '.join(sorted({ep.name for ep, _, _ in points})) or 'none'}; see `optiplug plugins`)",
                RuntimeWarning,
                stacklevel=4,
            )
