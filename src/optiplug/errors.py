"""The exception hierarchy. Every error a user can cause is an :class:`OptiplugError`.

The CLI prints ``optiplug: <message>`` for these and exits non-zero without a traceback,
so each message must say what was wrong, what was expected and what to do.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DuplicateNameError",
    "MissingDependencyError",
    "OptiplugError",
    "PluginError",
    "UnknownNameError",
]


class OptiplugError(Exception):
    """Base class of every error optiplug raises for a user to act on."""


class ConfigError(OptiplugError):
    """A config value is wrong, conflicting, or incompatible with the setup.

    Deliberately not a ``ValueError``: raised inside a pydantic validator it propagates
    with its own message instead of being folded into a ``ValidationError``.
    """


class UnknownNameError(ConfigError, KeyError):
    """A config selects an optimizer or scheduler name that no plugin registered."""

    def __init__(self, kind: str, name: str, registered: Iterable[str], also: Iterable[str] = (), note: str = ""):
        """``registered``: the names listed; ``also``: further names to suggest from (aliases); ``note``: why it
        may be missing (a plugin left out by OPTIPLUG_DISABLE_PLUGINS), said before any suggestion."""
        self.kind, self.name, self.registered = kind, name, sorted(registered)
        close = difflib.get_close_matches(str(name), [*self.registered, *sorted(also)], n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        listing = ", ".join(self.registered) or "(none)"
        why = f" ({note})" if note else ""
        super().__init__(f"unknown {kind} {name!r}{why}.{hint}\n  registered: {listing} (see `optiplug list`)")

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0])


class DuplicateNameError(OptiplugError):
    """Two plugins registered the same name."""


class MissingDependencyError(OptiplugError, ImportError):
    """A plugin's optimizer needs a package that is not installed."""


class PluginError(OptiplugError):
    """A plugin failed to load or broke the plugin contract."""


class CheckpointError(OptiplugError):
    """A checkpoint cannot be read or does not match the run."""
