"""The pydantic bases every optimizer and scheduler config subclasses (a leaf module: pydantic only).

A subclass declares its registry name as ``name: Literal["..."] = "..."`` and its fields with
types and defaults. Configs are frozen and forbid unknown fields, so a typo in a YAML file is
an error, not a silent default.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

__all__ = ["OptimizerConfig", "ScalarFields", "SchedulerConfig", "coerce_scalar", "format_validation_error"]


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
    """Fit a value read from YAML or the command line to the field's type, before pydantic validates it.

    - A number for a field that takes text but no number becomes the text the user typed
      (``run_name=1e3`` -> ``"1e3"``; YAML numbers carry ``source_text``).
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
        return getattr(value, "source_text", None) or str(value)
    return value


class ScalarFields(BaseModel):
    """A model whose fields get :func:`coerce_scalar` before validation; numbers must be finite."""

    model_config = ConfigDict(allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _coerce_scalars(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            key: coerce_scalar(fields[key].annotation, value) if key in fields else value for key, value in data.items()
        }


class OptimizerConfig(ScalarFields):
    """Base of every optimizer config. Subclasses declare ``name: Literal["..."] = "..."``."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True, allow_inf_nan=False)
    name: str


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
        if problem["type"] not in ("missing", "extra_forbidden") and not isinstance(got, (dict, list)):
            message += f" (got {got!r})"
        lines.append(f"{where}: {message}")
    return "\n  ".join(lines)
