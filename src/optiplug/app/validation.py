"""Checks of a run config that need transformers (imported only here, only when called)."""

from __future__ import annotations

import dataclasses
import difflib
import tempfile
import warnings
from typing import Any

from pydantic import ConfigDict

from optiplug.app.config import RunConfig
from optiplug.app.values import plain
from optiplug.configs import coerce_scalar
from optiplug.errors import ConfigError
from optiplug.transformers_args import TRAINING_ARGUMENT_FIELDS, training_argument_value

__all__ = ["check_training_section", "training_arguments"]


def training_arguments(config: RunConfig, defaults: dict[str, Any] | None = None) -> Any:
    """``TrainingArguments`` from ``defaults`` updated with the ``training`` section, with clear errors.

    The learning rate, betas, eps and weight decay are copied from the optimizer section (when
    it has them) so that TrainingArguments, and everything that logs it, agree with the optimizer.

    Raises:
        ConfigError: an unknown key (with a "did you mean"), or a value TrainingArguments rejects.
    """
    from transformers import TrainingArguments

    from optiplug.app.safety import OVERWRITE

    known = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    section = dict(config.training)
    if not isinstance(section.pop(OVERWRITE, False), bool):
        raise ConfigError(f"training.{OVERWRITE}: expected true or false (got {config.training[OVERWRITE]!r})")
    for key in section:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"training.{key}: not an argument of transformers.TrainingArguments.{hint}")
    training = _check_types(TrainingArguments, section)
    _check_bounds(training)
    if ("save_steps" in training or "save_total_limit" in training) and "save_strategy" not in training:
        training["save_strategy"] = "steps"  # asking for saves without a strategy means every save_steps
    kwargs = dict(defaults or {})
    kwargs.update(training)
    for key in TRAINING_ARGUMENT_FIELDS:
        value = training_argument_value(config.optimizer, key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            kwargs[key] = value
    kwargs.setdefault("output_dir", tempfile.gettempdir())
    _check_no_upload(kwargs)
    try:
        args = _make(TrainingArguments, kwargs)
    except (TypeError, ValueError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        # Name the key: retry with one given key at a time (only on this error path).
        base = {k: v for k, v in kwargs.items() if k not in training}
        for key, value in training.items():
            try:
                _make(TrainingArguments, {**base, key: value})
            except (TypeError, ValueError) as single:
                detail = str(single).strip().splitlines()[0] if str(single).strip() else type(single).__name__
                raise ConfigError(f"training.{key}: {detail}") from None
        raise ConfigError(f"training: TrainingArguments rejects the training section: {message}") from None
    _check_reporting(args.report_to)
    return args


def _check_no_upload(kwargs: dict[str, Any]) -> None:
    if kwargs.get("push_to_hub"):
        raise ConfigError(
            "training.push_to_hub: a run never uploads (it must not need the network); remove it, and upload the "
            "output directory when the run has finished (`hf upload REPO OUTPUT_DIR`)"
        )


# The package each integration of transformers needs (kubeflow needs a server, not a package).
_REPORT_PACKAGES = {"azure_ml": "azureml-core", "comet_ml": "comet-ml", "flyte": "flytekit"}


def _check_reporting(report_to: list[str]) -> None:
    """Each ``training.report_to`` integration must be one transformers knows, with its package installed."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    available = get_available_reporting_integrations()
    for name in report_to:
        if name in ("all", "none"):
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            known = ", ".join(sorted(INTEGRATION_TO_CALLBACK))
            raise ConfigError(f"training.report_to: unknown integration {name!r} (transformers knows: {known}, none)")
        if name not in available:
            needs = "KUBEFLOW_TRAINER_SERVER_URL" if name == "kubeflow" else "its package"
            install = "" if name == "kubeflow" else f": pip install {_REPORT_PACKAGES.get(name, name)}"
            raise ConfigError(
                f"training.report_to: {name!r} is not available here (it needs {needs}){install}; "
                "or set training.report_to=none"
            )


# Counts TrainingArguments accepts but cannot train with (0 steps trained one; a batch of 0 crashed mid-run).
_POSITIVE = ("per_device_train_batch_size", "gradient_accumulation_steps", "save_steps", "logging_steps")


def _check_bounds(training: dict[str, Any]) -> None:
    steps = training.get("max_steps")
    if isinstance(steps, int) and steps != -1 and steps < 1:
        raise ConfigError(
            f"training.max_steps: expected a positive number of steps, or -1 to train num_train_epochs (got {steps})"
        )
    for key in _POSITIVE:
        value = training.get(key)
        if isinstance(value, (int, float)) and value <= 0:
            raise ConfigError(f"training.{key}: expected a number greater than 0 (got {value})")


def _make(cls: type, kwargs: dict[str, Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(**kwargs)


# Annotations narrower than what TrainingArguments accepts and documents (``fsdp=True`` + ``fsdp_config``).
_ACCEPTED: dict[str, Any] = {"fsdp": bool | str | list[str] | None}


def _check_types(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Type-check values against the dataclass's annotations (the dataclass itself does not).

    Returns the values fitted to their fields (:func:`coerce_scalar`: text fields keep the text typed), numbers
    as Python's own (:func:`~optiplug.app.values.plain`).
    """
    import typing

    from pydantic import TypeAdapter, ValidationError

    hints = typing.get_type_hints(cls)
    hints.update(_ACCEPTED)
    fitted: dict[str, Any] = {}
    for key, value in values.items():
        try:
            value = fitted[key] = plain(coerce_scalar(hints[key], value))
        except ValueError as error:
            raise ConfigError(f"training.{key}: {error}") from None
        try:
            adapter = TypeAdapter(hints[key], config=ConfigDict(allow_inf_nan=False))
        except Exception:  # an annotation pydantic cannot express: TrainingArguments checks it itself
            continue
        try:
            adapter.validate_python(value)
        except ValidationError as error:
            message = error.errors(include_url=False)[0]["msg"]
            raise ConfigError(f"training.{key}: {message} (got {value!r})") from None
    return fitted


def check_training_section(config: RunConfig) -> None:
    """Raise :class:`ConfigError` if the ``training`` section is not valid ``TrainingArguments``."""
    training_arguments(config, {"report_to": "none"})
