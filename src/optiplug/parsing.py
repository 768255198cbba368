"""Parsing a section into its registered config: a name, a mapping with ``name``, a config object or None (the
default entry), with an alias's preset fields applied, validated by the one config class the name selects."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any, Union

from pydantic import Field, ValidationError

from optiplug.configs import OptimizerConfig, SchedulerConfig, format_validation_error
from optiplug.errors import ConfigError, PluginError
from optiplug.tables import Resolved, Tables

_BASES: dict[str, type[Any]] = {"optimizer": OptimizerConfig, "scheduler": SchedulerConfig}


def union_of(classes: list[type]) -> Any:
    """``Annotated[Union[...], Field(discriminator="name")]`` of ``classes`` (the class itself when there is one)."""
    if len(classes) == 1:
        return classes[0]
    return Annotated[Union[tuple(classes)], Field(discriminator="name")]


def _plain(value: Any) -> Any:
    """A value as YAML gives it (tuples as lists), to compare a user's value with a preset."""
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return value


def parse(
    tables: Tables,
    kind: str,
    value: Any,
    fields: Mapping[str, Any] | None = None,
    *,
    default: Callable[[], str],
    transformers: bool = False,
) -> Any:
    """``value`` with ``fields`` on top, validated into the config class its name selects in ``tables``
    (``default()``: the name a section without one selects); see :meth:`optiplug.registry.Registry.parse`."""
    base = _BASES[kind]
    if isinstance(value, base) and not fields:
        tables.resolve(kind, value.name)  # a config object must still name a registered entry
        return value
    if isinstance(value, base):  # only the fields it was given: validators may ask which ones (min_lr or rate)
        value = {**value.model_dump(exclude_unset=True), "name": value.name}
    elif isinstance(value, str):
        value = {"name": value}
    elif value is None:
        value = {}
    if not isinstance(value, Mapping):
        example = default()
        raise ConfigError(
            f"{kind}: expected a name ({kind}: {example}) or a mapping with a 'name' key "
            f"({kind}: {{name: {example}, ...}}), got {_described(value)}"
        )
    value = {**value, **(fields or {})}
    if "name" not in value:  # a section without a name configures the default entry
        value["name"] = default()
    found = tables.resolve(kind, value["name"], transformers=transformers)
    if found.alias is not None:
        value = with_preset(kind, found, value)
    return validate(tables, kind, value)


def with_preset(kind: str, found: Resolved, value: Mapping[str, Any]) -> dict[str, Any]:
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


def validate(tables: Tables, kind: str, value: Mapping[str, Any]) -> Any:
    """A mapping with a registered ``name``, validated into that entry's config class (the one place that does).

    Raises:
        UnknownNameError, DuplicateNameError, ConfigError (one line per invalid field).
    """
    # The discriminator selects exactly this class: validating with it alone skips building the whole union.
    config = tables.resolve(kind, value["name"]).row.entry.config
    try:
        return config.model_validate(value)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, kind)) from None


def _described(value: Any) -> str:
    """A value as a YAML writer reads it: ``5 (a number)``, not its Python class (an ``int`` subclass, say)."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, (int, float)):
        return f"{value!r} (a number)"
    if isinstance(value, (list, tuple)):
        return f"{list(value)!r} (a list)"
    return f"{value!r}"
