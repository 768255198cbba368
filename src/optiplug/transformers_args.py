"""What transformers' ``TrainingArguments`` mean for the registry: ``optim`` + ``optim_args`` -> an optimizer config.

``TrainingArguments.optim`` names are aliases (``optiplug.Alias(..., transformers=True)``) declared by the
entries that provide them; an alias's ``arguments(args, optim_args)`` says which values transformers' own
Trainer takes for that name (:func:`transformers_fields` builds the usual ones). Importing this module does
not import torch or transformers.
"""

from __future__ import annotations

import types
from collections.abc import Iterable, Mapping
from typing import Any

from optiplug.errors import ConfigError

__all__ = [
    "ADAM_ARGUMENTS",
    "TRAINING_ARGUMENT_FIELDS",
    "TRAINING_DEFAULTS",
    "arguments_view",
    "optim_name",
    "optimizer_from_arguments",
    "parse_optim_args",
    "scheduler_from_arguments",
    "training_argument_value",
    "transformers_fields",
    "transformers_targets",
]

TRAINING_ARGUMENT_FIELDS: dict[str, tuple[str, int | None]] = {
    "learning_rate": ("lr", None),
    "weight_decay": ("weight_decay", None),
    "adam_beta1": ("betas", 0),
    "adam_beta2": ("betas", 1),
    "adam_epsilon": ("eps", None),
}
"""``TrainingArguments`` field -> (optimizer config field, index in it or None): the one table of what the
optimizer section owns, used by the run config (conflicts are errors) and the trainer (defaults from ``args``)."""


def training_argument_value(cfg: Any, key: str) -> Any:
    """The value ``cfg`` holds for the ``TrainingArguments`` field ``key`` (None: the config has no such field)."""
    field, index = TRAINING_ARGUMENT_FIELDS[key]
    value = getattr(cfg, field, None)
    if value is None or index is None:
        return value
    return value[index]


ADAM_ARGUMENTS = ("learning_rate", "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay")
"""What transformers passes to an Adam-family optimizer: the rate, betas, epsilon (and weight decay via groups)."""


def parse_optim_args(text: str | None) -> dict[str, str]:
    """``"rank=8, scale=0.25"`` -> ``{"rank": "8", "scale": "0.25"}`` (transformers' own parsing).

    Raises:
        ConfigError: an item without ``=``.
    """
    parsed: dict[str, str] = {}
    for item in filter(None, (text or "").replace(" ", "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(
                f"TrainingArguments.optim_args: expected KEY=VALUE items separated by commas, got {item!r}"
            )
        parsed[key] = value
    return parsed


def transformers_fields(
    args: Any,
    optim_args: Mapping[str, str],
    *,
    take: Iterable[str] = ADAM_ARGUMENTS,
    defaults: Mapping[str, Any] | None = None,
    keys: Mapping[str, str | None] | None = None,
    only: Iterable[str] | None = None,
    targets: bool = False,
) -> dict[str, Any]:
    """The config fields transformers' Trainer uses for ``args``: an alias's ``arguments`` in one call.

    Args:
        args: the ``TrainingArguments``.
        optim_args: the parsed ``args.optim_args``.
        take: the ``TrainingArguments`` fields transformers passes for this name (of ``ADAM_ARGUMENTS``).
        defaults: transformers' defaults for this name where they differ from the entry's (``optim_args``
            may change them, unlike an alias's preset).
        keys: ``optim_args`` keys to rename (``{"proj": "projection"}``) or to drop (None: transformers
            ignores it too); any other key is the config field of its name (values are validated as
            that field's type).
        only: the ``optim_args`` keys transformers reads for this name (after ``keys``); any other key is
            refused, since transformers' Trainer would ignore it silently. None: every key is a config field.
        targets: transformers requires ``optim_target_modules`` for this name (GaLore, APOLLO): it becomes
            ``target_modules`` (:func:`transformers_targets`), and leaving it unset is refused as transformers does.

    Raises:
        ConfigError: an ``optim_args`` key outside ``only``; ``targets`` without ``optim_target_modules``.
    """
    fields: dict[str, Any] = {}
    betas = [getattr(args, "adam_beta1", 0.9), getattr(args, "adam_beta2", 0.999)]
    for key in take:
        field, index = TRAINING_ARGUMENT_FIELDS[key]
        if index is None:
            fields[field] = getattr(args, key)
        else:
            fields[field] = tuple(betas)
    fields.update(defaults or {})
    if targets:
        fields["target_modules"] = transformers_targets(getattr(args, "optim_target_modules", None))
    renames = dict(keys or {})
    read = None if only is None else list(only)
    for key, value in optim_args.items():
        if read is not None and key not in read:
            raise ConfigError(
                f"optim_args key {key!r} is not read by transformers' Trainer for this optimizer (it reads "
                f"{', '.join(read) or 'none'}), so it would not change its steps: drop it, or select the optimizer "
                "with an optimizer section to set other fields"
            )
        target = renames.get(key, key)
        if target is not None:
            fields[target] = value
    return fields


def transformers_targets(value: Any) -> str | list[str]:
    """``TrainingArguments.optim_target_modules`` as a ``target_modules`` field selecting the same modules.

    transformers' rule is optiplug's (:mod:`optiplug.targets`) but for ``"all-linear"`` (or ``"all_linear"``):
    transformers takes every ``nn.Linear``, the output head too, so it becomes the regex ``".*"``.

    Raises:
        ConfigError: ``value`` is None (transformers refuses it too) or not a string or a list of strings.
    """
    if value is None:
        raise ConfigError(
            "this optimizer needs TrainingArguments.optim_target_modules (transformers' Trainer refuses it unset "
            "too): set it to 'all-linear', a regex, or a list of module names such as ['attn', 'mlp']"
        )
    if isinstance(value, str):
        return ".*" if value.replace("_", "-") == "all-linear" else value
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return list(value)
    raise ConfigError(f"TrainingArguments.optim_target_modules must be a string or a list of strings, got {value!r}")


TRAINING_DEFAULTS: dict[str, Any] = {
    "optim": "adamw_torch_fused",
    "optim_args": None,
    "optim_target_modules": None,
    "learning_rate": 5e-5,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "weight_decay": 0.0,
    "warmup_steps": 0,
    "lr_scheduler_type": "linear",
    "lr_scheduler_kwargs": None,
}
"""transformers 5's ``TrainingArguments`` defaults of the values the aliases read (without importing it)."""


def arguments_view(training: Mapping[str, Any]) -> Any:
    """A run config's ``training`` section as the ``TrainingArguments`` the aliases read (defaults filled in)."""
    return types.SimpleNamespace(**{**TRAINING_DEFAULTS, **training})


def optim_name(args: Any) -> str:
    """``args.optim`` as a plain string (transformers keeps an ``OptimizerNames`` member)."""
    return str(getattr(args.optim, "value", args.optim))


def optimizer_from_arguments(args: Any) -> Any:
    """The optimizer transformers' Trainer would build for ``args.optim``, ``optim_args`` and
    ``optim_target_modules``: the entry whose transformers alias has that name, with the values transformers
    takes (learning rate, betas, eps, weight decay, its defaults and ``optim_args``), or a one-line refusal."""
    from optiplug.errors import UnknownNameError
    from optiplug.registry import registry as the_registry

    name = optim_name(args)
    try:
        found = the_registry.resolve("optimizer", name, transformers=True)
    except UnknownNameError:
        found = None
    alias = found.alias if found is not None else None
    if found is None or alias is None or not alias.transformers:
        raise ConfigError(transformers_hint(name, found.row.plugin if found is not None else None))
    optim_args = parse_optim_args(getattr(args, "optim_args", None))
    try:
        if alias.arguments is not None:
            fields = dict(alias.arguments(args, optim_args))
        else:
            known = found.row.entry.config.model_fields
            fields = {k: v for k, v in transformers_fields(args, {}).items() if k in known}
            fields.update(optim_args)
        targets = getattr(args, "optim_target_modules", None)
        if targets is not None and "target_modules" in found.row.entry.config.model_fields:
            fields.setdefault("target_modules", transformers_targets(targets))
    except ConfigError as error:
        raise ConfigError(f"TrainingArguments.optim={name!r}: {error}") from None
    try:
        return the_registry.parse("optimizer", name, fields, transformers=True)
    except ConfigError as error:
        raise ConfigError(f"TrainingArguments.optim={name!r} (with optim_args {optim_args}): {error}") from None


def transformers_hint(name: str, plugin: str | None = None) -> str:
    """One line for a ``TrainingArguments.optim`` name no entry maps: the default plugin's (which knows the
    plugins that map transformers' names), asked through the plugin manager like any plugin."""
    from optiplug.registry import get_plugin_manager

    hint = getattr(get_plugin_manager().get_plugin("optiplug:transformers"), "transformers_hint", None)
    if callable(hint):
        return str(hint(name, plugin))
    return (
        f"TrainingArguments.optim={name!r} is not mapped by any installed optiplug plugin: select an optimizer "
        "explicitly (optimizer=NAME; `optiplug list`)"
    )


def scheduler_from_arguments(args: Any) -> Any:
    """The scheduler named by ``args.lr_scheduler_type`` with ``args.lr_scheduler_kwargs``: the entry whose
    transformers alias has that name (its ``arguments`` translate the kwargs), else the entry of that name."""
    from optiplug.errors import UnknownNameError
    from optiplug.registry import registry as the_registry

    name = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    kwargs = dict(args.lr_scheduler_kwargs or {})
    try:
        found = the_registry.resolve("scheduler", name, transformers=True)
    except UnknownNameError:
        found = None
    try:
        fields = kwargs
        if found is not None and found.alias is not None and found.alias.arguments is not None:
            fields = dict(found.alias.arguments(args, kwargs))
        if found is not None and "warmup_steps" in found.row.entry.config.model_fields:
            fields.setdefault("warmup_steps", 0)  # filled in from args when the step count is known
        return the_registry.parse("scheduler", name, fields, transformers=True)
    except ConfigError as error:
        raise ConfigError(
            f"TrainingArguments.lr_scheduler_type={name!r} (lr_scheduler_kwargs {kwargs}): {error}"
        ) from None
