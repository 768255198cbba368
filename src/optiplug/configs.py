"""The pydantic bases every optimizer and scheduler config subclasses (a leaf module: pydantic only).

A subclass declares its registry name as ``name: Literal["..."] = "..."`` and its fields with
types and defaults. Configs are frozen and forbid unknown fields, so a typo in a YAML file is
an error, not a silent default.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["OptimizerConfig", "SchedulerConfig", "format_validation_error"]


class OptimizerConfig(BaseModel):
    """Base of every optimizer config. Subclasses declare ``name: Literal["..."] = "..."``."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)
    name: str


class SchedulerConfig(BaseModel):
    """Base of every scheduler config. Subclasses declare ``name: Literal["..."] = "..."``."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)
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
