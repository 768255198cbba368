"""The pydantic bases every optimizer and scheduler config subclasses (a leaf module: pydantic only).

A subclass declares its registry name as ``name: Literal["..."] = "..."`` and its fields with
types and defaults. Configs are frozen and forbid unknown fields, so a typo in a YAML file is
an error, not a silent default.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "OptimizerConfig",
    "ParamGroupRule",
    "ScalarFields",
    "SchedulerConfig",
    "coerce_scalar",
    "format_validation_error",
]


def _leaf_types(annotation: Any) -> set[type]:
    """The plain types an annotation admits: ``int | None`` -> {int, NoneType}; ``Literal["a"]`` -> {str}."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _leaf_types(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        return {type(value) for value in typing.get_args(annotation)}
    if origin is typing.Union or origin is types.UnionType:
        return set().union(*(_leaf_types(arg) for arg in typing.get_args(annotation)))
    if isinstance(annotation, type):
        return {annotation}
    return {object}  # a container or anything else: leave the value to pydantic


def coerce_scalar(annotation: Any, value: Any) -> Any:
    """Fit a value to the field's type before pydantic validates it.

    - A number for a field that takes text but no number becomes its text, ``str(number)``.
    - A boolean for a numeric field is refused (pydantic would read ``true`` as 1).

    Raises:
        ValueError: a boolean given for a number.
    """
    leaves = _leaf_types(annotation)
    numeric = leaves & {int, float}
    if isinstance(value, bool):
        if numeric and bool not in leaves and object not in leaves:
            raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
        return value
    if isinstance(value, (int, float)) and str in leaves and not numeric and object not in leaves:
        return str(value)
    return value


class _BooleanForNumber:
    """Stands in for a boolean given to a numeric field: no number validator accepts it."""

    def __init__(self, value: bool):
        self.value = value

    def __repr__(self) -> str:
        return str(self.value).lower()


class ScalarFields(BaseModel):
    """A model whose fields get :func:`coerce_scalar` before validation; numbers must be finite."""

    model_config = ConfigDict(allow_inf_nan=False, defer_build=True)  # built on first validation: start-up

    @model_validator(mode="before")
    @classmethod
    def _coerce_scalars(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fitted = dict(data)
        for key, value in data.items():
            field = cls.model_fields.get(key)
            if field is not None:
                try:
                    fitted[key] = coerce_scalar(field.annotation, value)
                except ValueError:
                    fitted[key] = _BooleanForNumber(value)  # fails the field's own validation, at its location
        return fitted


_RULE_KEYS = frozenset({"match", "name", "lr", "lr_scale", "weight_decay", "decay_all"})


class ParamGroupRule(ScalarFields):
    """One entry of ``optimizer.param_groups``: the parameters whose names match, and their options.

    Any other key is a per-group option of the optimizer (``betas``, ``eps``, ``momentum``, ...),
    checked against the optimizer once it is built (an option it does not take is an error).
    """

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False, defer_build=True)
    match: str = Field(description="Regex searched in each trainable parameter's name (re.search); first match wins.")
    name: str | None = Field(None, min_length=1, description="Label in the logs (lr/NAME); default: the pattern.")
    lr: float | None = Field(None, gt=0, description="This group's learning rate (instead of the optimizer's).")
    lr_scale: float | None = Field(None, gt=0, description="This group's learning rate: the optimizer's times this.")
    weight_decay: float | None = Field(
        None, ge=0, description="Weight decay of the matched parameters the no-decay rule leaves decayed."
    )
    decay_all: bool = Field(False, description="Apply weight_decay to matched biases and norms too.")

    @model_validator(mode="before")
    @classmethod
    def _tuples(cls, data: Any) -> Any:
        # YAML gives lists; optimizers take tuples (betas) and configs are frozen.
        if isinstance(data, dict):
            return {k: tuple(v) if isinstance(v, list) and k not in _RULE_KEYS else v for k, v in data.items()}
        return data

    @model_validator(mode="after")
    def _valid(self) -> ParamGroupRule:
        try:
            re.compile(self.match)
        except re.error as error:
            raise ValueError(f"match {self.match!r} is not a valid regex: {error}") from None
        if self.lr is not None and self.lr_scale is not None:
            raise ValueError("set lr or lr_scale, not both")
        if "params" in (self.model_extra or {}):
            raise ValueError("'params' is chosen by match; remove it")
        return self

    @property
    def label(self) -> str:
        """The group's name in logs and printouts."""
        return self.name or self.match

    @property
    def options(self) -> dict[str, Any]:
        """The optimizer's per-group options this entry sets (``lr``, ``weight_decay`` and the extra keys)."""
        given = {"lr": self.lr, "weight_decay": self.weight_decay}
        return {**{k: v for k, v in given.items() if v is not None}, **(self.model_extra or {})}


class OptimizerConfig(ScalarFields):
    """Base of every optimizer config. Subclasses declare ``name: Literal["..."] = "..."``.

    ``param_groups`` is in every optimizer's config: it applies to every optimizer whose factory
    takes its groups from :meth:`BuildContext.param_groups` (the contract for plugins).
    ``layerwise`` is too: the core steps each parameter in its gradient hook (``optiplug.layerwise``)
    for every optimizer whose entry declares ``per_parameter=True``, and refuses it for the others.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True, allow_inf_nan=False)
    name: str
    param_groups: tuple[ParamGroupRule, ...] = Field(
        (),
        description="Parameter groups by name: [{match: REGEX, lr | lr_scale, weight_decay, other options}]; "
        "first match wins, the rest form the default group.",
    )
    layerwise: bool = Field(
        False,
        description="Step each parameter inside its post-accumulate-grad hook and free its gradient at once "
        "(at the gradient-accumulation boundary); clipping is then per parameter. For optimizers whose entry "
        "declares per_parameter=True; single process only.",
    )
    offload: Literal["none", "cpu"] = Field(
        "none",
        description="'cpu': keep the optimizer's state on the CPU and step there (torchao's CPUOffloadOptimizer; "
        "CUDA/XPU models, one process, per-parameter optimizers; needs optiplug-torchao).",
    )

    @field_validator("param_groups")
    @classmethod
    def _distinct_labels(cls, rules: tuple[ParamGroupRule, ...]) -> tuple[ParamGroupRule, ...]:
        labels = [rule.label for rule in rules]
        for label in labels:
            if label == "default":
                raise ValueError("'default' names the parameters no entry matches; choose another name")
            if labels.count(label) > 1:
                raise ValueError(f"two entries are labelled {label!r}; give them distinct names (name: ...)")
        return rules


class SchedulerConfig(ScalarFields):
    """Base of every scheduler config. Subclasses declare ``name: Literal["..."] = "..."``."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True, allow_inf_nan=False)
    name: str


def format_validation_error(error: ValidationError, prefix: str = "", tag: str | None = None) -> str:
    """One line per problem: ``optimizer.rank: Input should be greater than 0 (got -4)``."""
    lines = []
    for problem in error.errors(include_url=False):
        loc = [str(part) for part in problem["loc"]]
        # drop the union tag pydantic inserts for discriminated unions (``optimizer.galore_adamw.rank``)
        if tag is not None and loc and loc[0] == tag:
            loc = loc[1:]
        where = ".".join([p for p in [prefix, *loc] if p]) or "config"
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown field; check the spelling (`optiplug show NAME` lists the fields)"
        elif problem["type"] == "missing":
            message = "required field is missing"
        got = problem.get("input")
        if isinstance(got, _BooleanForNumber):
            lines.append(f"{where}: expected a number, got the boolean {got!r}")
            continue
        if problem["type"] not in ("missing", "extra_forbidden") and not isinstance(got, (dict, list)):
            message += f" (got {got!r})"
        lines.append(f"{where}: {message}")
    return "\n  ".join(lines)
