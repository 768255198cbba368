"""The run config (``RunConfig``: model, data, training, optimizer, scheduler, finetuning), YAML and overrides.

The optimizer and scheduler sections are parsed by the registry (:meth:`~optiplug.registry.Registry.parse`) into
the registered config classes; YAML files, ``a.b=value`` command-line overrides and the Python
API all go through it. A config can only select registered names: there is no import-path
escape hatch.

Values are read by YAML 1.2's core schema (:mod:`optiplug.app.values`): ``no``, ``yes``, ``on``
and ``off`` are text (``save_strategy: no``), ``5e-1`` is a number.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from optiplug.app.values import load_yaml, scalar
from optiplug.configs import OptimizerConfig, ScalarFields, SchedulerConfig, format_validation_error
from optiplug.errors import ConfigError
from optiplug.registry import parse_optimizer, parse_scheduler, registry
from optiplug.transformers_args import TRAINING_ARGUMENT_FIELDS, training_argument_value

__all__ = [
    "EMBEDDED",
    "CooldownConfig",
    "DataConfig",
    "FinetuningConfig",
    "GuardConfig",
    "ModelConfig",
    "RunConfig",
    "apply_overrides",
    "load_config",
    "read_yaml",
    "resolve_config",
    "run_config_schema",
    "split_config_and_overrides",
    "validate_config",
]

EMBEDDED = "embedded"
"""``model.name_or_path`` / ``data.path`` value for the tiny model and corpus shipped in the package."""


# ---- the run config -------------------------------------------------------------------------


class _Section(ScalarFields):
    # built on first use: `optiplug list` stays fast
    model_config = ConfigDict(extra="forbid", defer_build=True, allow_inf_nan=False)


class ModelConfig(_Section):
    """Which model to train."""

    name_or_path: str = Field(
        EMBEDDED,
        description="A local model directory, a hub id already in the local cache, or 'embedded' "
        "(the tiny Llama-style model shipped with optiplug, randomly initialised).",
    )
    tokenizer: str | None = Field(None, description="Tokenizer directory or id; defaults to name_or_path.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype.")
    from_scratch: bool = Field(
        False, description="Initialise randomly from the model's config.json instead of loading its weights."
    )
    trust_remote_code: bool = False


class DataConfig(_Section):
    """What to train on: text cut into blocks of ``block_size`` tokens."""

    path: str | list[str] = Field(
        EMBEDDED,
        description="'embedded' (the corpus shipped with optiplug) or local .txt/.jsonl/.json files or directories.",
    )
    text_field: str = Field("text", description="Field holding the text in .jsonl/.json records.")
    block_size: int = Field(128, gt=0, description="Tokens per training example.")
    max_blocks: int | None = Field(
        None, gt=0, description="Use at most this many blocks (with eval_ratio: read, before the evaluation share)."
    )
    eval_path: str | list[str] | None = Field(
        None,
        description="Evaluation text: local .txt/.jsonl/.json files or directories (as path, none of path's files).",
    )
    eval_ratio: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Hold out this share of the corpus for evaluation: the last tokens, split off before the "
        "blocks are cut, so no evaluation token is trained on.",
    )
    eval_max_blocks: int | None = Field(None, gt=0, description="Evaluate on at most this many blocks.")

    @model_validator(mode="after")
    def _one_evaluation_source(self) -> DataConfig:
        if self.eval_path is not None and self.eval_ratio is not None:
            raise ValueError("set eval_path or eval_ratio, not both")
        if self.eval_max_blocks is not None and not self.has_evaluation:
            raise ValueError("eval_max_blocks is only used with eval_path or eval_ratio")
        return self

    @property
    def has_evaluation(self) -> bool:
        """Whether the run has evaluation data (``eval_path`` or ``eval_ratio``)."""
        return self.eval_path is not None or self.eval_ratio is not None


class FinetuningConfig(_Section):
    """Which parameters train: all of them (``full``), some (``freeze``), or a LoRA adapter (``lora``).

    ``lora`` wraps the model with the ``peft`` library (``pip install 'optiplug[lora]'``); its
    fields (``r``, ``alpha``, ``dropout``, ``target_modules``, ``init``, ``pissa_convert``) are
    only used with that type.
    """

    type: Literal["full", "freeze", "lora"] = "full"
    trainable: list[str] = Field(
        default_factory=list,
        description="With type 'freeze': regexes of parameter names to train (re.search); all others are frozen.",
    )
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: float | None = Field(
        None, gt=0, description="LoRA scaling numerator (the update is scaled by alpha / r); default 2 * r."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch's input.")
    target_modules: str | list[str] = Field(
        "all-linear",
        description="Modules that get an adapter: 'all-linear' (every linear layer but the output head), "
        "a regex matched against full module names, or a list of names (q_proj, model.layers.0.mlp.up_proj).",
    )
    init: str = Field(
        "default",
        description="Adapter initialisation: 'default' (B = 0, A Kaiming-uniform), 'gaussian' (A Gaussian), "
        "'pissa' (principal singular vectors of each weight, full SVD) or 'pissa_niter_N' "
        "(fast PiSSA: randomized SVD with N subspace iterations).",
    )
    pissa_convert: bool = Field(
        False,
        description="With init 'pissa*': at the end of training also save the adapter converted to a plain LoRA "
        "adapter that applies to the original base model (output_dir/pissa_converted).",
    )

    @field_validator("init")
    @classmethod
    def _known_init(cls, value: str) -> str:
        if not _LORA_INIT.fullmatch(value):
            raise ValueError("expected 'default', 'gaussian', 'pissa' or 'pissa_niter_N' with N a positive integer")
        return value

    @field_validator("trainable")
    @classmethod
    def _trainable_regexes(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"{pattern!r} is not a valid regular expression: {error}") from None
        return value

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list):
            if not value or not all(value):
                raise ValueError("expected a non-empty list of module names, a regex or 'all-linear'")
        else:
            try:
                re.compile(value)
            except re.error as error:
                raise ValueError(f"{value!r} is not a valid regular expression: {error}") from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> FinetuningConfig:
        if self.type == "freeze" and not self.trainable:
            raise ValueError("type 'freeze' needs 'trainable': the parameter-name patterns to train")
        if self.type != "freeze" and self.trainable:
            raise ValueError("'trainable' is only used with type 'freeze'")
        if self.type != "lora":
            changed = [
                f"'{name}'" for name in _LORA_FIELDS if getattr(self, name) != type(self).model_fields[name].default
            ]
            if changed:
                raise ValueError(
                    f"{', '.join(changed)} {'is' if len(changed) == 1 else 'are'} only used with type 'lora'"
                )
        if self.pissa_convert and not self.init.startswith("pissa"):
            raise ValueError(f"pissa_convert needs init 'pissa' or 'pissa_niter_N' (init is {self.init!r})")
        return self

    @property
    def lora_alpha(self) -> float:
        """``alpha``, or ``2 * r`` when it is not set."""
        return float(self.alpha) if self.alpha is not None else 2.0 * self.r


_LORA_FIELDS = ("r", "alpha", "dropout", "target_modules", "init", "pissa_convert")
_LORA_INIT = re.compile(r"default|gaussian|pissa|pissa_niter_[1-9][0-9]*")


class CooldownConfig(_Section):
    """A decay branched from a checkpoint (with ``training.resume_from_checkpoint``); see docs/configuration.md.

    The shape and floor default to the schedule's own decay (``warmup_stable_decay``), and for a
    schedule without one (``constant``) to a cosine decay to 0.
    """

    steps: int = Field(gt=0, description="Optimizer steps of the cooldown, after the checkpoint's step.")
    decay_type: Literal["linear", "cosine", "1-sqrt"] | None = Field(
        None, description="Shape of the decay (default: the schedule's; cosine for constant)."
    )
    min_lr_ratio: float | None = Field(
        None, ge=0, le=1, description="Floor as a fraction of the peak (default: the schedule's; 0 for constant)."
    )
    num_cycles: float | None = Field(None, gt=0, description="Cosine decay: half-waves x 2 (default: 0.5).")


class GuardConfig(_Section):
    """When ``optiplug train`` stops a run as diverged (docs/configuration.md, "Safety"); ``null`` turns a rule off.

    The run stops with one line, ``summary.json`` says ``"status": "diverged"``, and no model is saved.
    """

    non_finite: bool = Field(
        True, description="Stop before an optimizer step whose loss or gradient norm is NaN or infinite."
    )
    loss_spike_factor: float | None = Field(
        3.0,
        gt=1,
        description="Stop when the logged training loss stays above this many times its lowest logged value for "
        "`patience` logged steps in a row (null: never).",
    )
    patience: int = Field(3, ge=1, description="Logged steps in a row for loss_spike_factor.")
    zero_grad_steps: int | None = Field(
        3,
        ge=1,
        description="Stop when, after step 1, the gradients the optimizer steps are exactly 0 for this many optimizer "
        "steps in a row: the weights no longer change (null: never).",
    )


# Keys of TrainingArguments that the scheduler section owns (the optimizer's: helpers.TRAINING_ARGUMENT_FIELDS).
_OWNED_BY_SCHEDULER = {"warmup_steps": "warmup_steps", "warmup_ratio": "warmup_ratio"}
# transformers' names for the optimizer and the schedule: they select the section when it is absent (as
# TrainingArguments would), and must agree with it when both are given.
_OPTIM_KEYS = ("optim", "optim_args", "optim_target_modules")
_SCHEDULER_KEYS = ("lr_scheduler_type", "lr_scheduler_kwargs")


def _sections_from_transformers_names(data: dict[str, Any]) -> dict[str, Any]:
    """``training.optim`` (``optim_args``, ``optim_target_modules``) and ``training.lr_scheduler_type``
    (``lr_scheduler_kwargs``) select the optimizer and scheduler sections a run leaves out, with transformers'
    values; given with the section, they must name the same entry (one-line error otherwise). A warmup the
    section now holds (schedule-free's optimizer, the scheduler) leaves the training section."""
    from optiplug.transformers_args import arguments_view, optimizer_from_arguments, scheduler_from_arguments

    training = data.get("training")
    if not isinstance(training, dict):
        return data
    args, training = arguments_view(training), dict(training)
    for keys, kind, build in (
        (_OPTIM_KEYS, "optimizer", optimizer_from_arguments),
        (_SCHEDULER_KEYS, "scheduler", scheduler_from_arguments),
    ):
        given = [key for key in keys if key in training]
        if not given:
            continue
        chosen = build(args)
        if data.get(kind) is None:
            data = {**data, kind: chosen}
            warmup = getattr(args, "warmup_steps", 0)
            if kind == "scheduler" and warmup and "warmup_steps" in type(chosen).model_fields:
                field = "warmup_ratio" if warmup < 1 else "warmup_steps"
                data[kind] = chosen.model_copy(update={field: warmup if warmup < 1 else int(warmup)})
                training.pop("warmup_steps", None)
            elif getattr(chosen, "warmup_steps", None) == warmup and warmup:
                training.pop("warmup_steps", None)  # the optimizer warms up itself (schedule-free)
            continue
        section = parse_optimizer(data[kind]) if kind == "optimizer" else parse_scheduler(data[kind])
        if section.name != chosen.name:
            name = "optim" if kind == "optimizer" else "lr_scheduler_type"
            raise ConfigError(
                f"training.{name}={training.get(name, getattr(args, name))!r} selects {kind} {chosen.name!r} but the "
                f"{kind} section is {section.name!r}: remove training.{', training.'.join(given)} or the {kind} section"
            )
    return {**data, "training": training}


def _same(a: Any, b: Any) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    except (TypeError, ValueError):
        return a == b


class RunConfig(_Section):
    """A whole run: model, data, Trainer arguments, optimizer, scheduler and fine-tuning type."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    training: dict[str, Any] = Field(
        default_factory=dict, description="Passed to transformers.TrainingArguments (output_dir, max_steps, ...)."
    )
    optimizer: SerializeAsAny[OptimizerConfig] = Field(default_factory=lambda: parse_optimizer(None))
    scheduler: SerializeAsAny[SchedulerConfig] = Field(default_factory=lambda: parse_scheduler(None))
    finetuning: FinetuningConfig = Field(default_factory=FinetuningConfig)
    cooldown: CooldownConfig | None = Field(
        None, description="A decay of `steps` steps branched from training.resume_from_checkpoint."
    )
    guard: GuardConfig = Field(default_factory=GuardConfig, description="When a run stops as diverged.")

    @model_validator(mode="before")
    @classmethod
    def _optimizer_brings_its_scheduler(cls, data: Any) -> Any:
        """A run that names no scheduler gets the optimizer's own (``OptimizerEntry.default_scheduler``), if any."""
        if isinstance(data, dict):
            data = _sections_from_transformers_names(data)
        if not isinstance(data, dict) or data.get("scheduler") is not None:
            return data
        optimizer = parse_optimizer(data.get("optimizer"))  # parsed here once; the field validator passes it on
        own = registry.lookup("optimizer", optimizer.name).entry.default_scheduler
        return {**data, "optimizer": optimizer, **({"scheduler": own} if own else {})}

    @field_validator("optimizer", mode="before")
    @classmethod
    def _optimizer(cls, value: Any) -> OptimizerConfig:
        return parse_optimizer(value)

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler(cls, value: Any) -> SchedulerConfig:
        return parse_scheduler(value)

    @model_validator(mode="after")
    def _one_source_of_truth(self) -> RunConfig:
        owned: list[tuple[str, str, Any, str]] = []  # (training key, kind, value in the section, field label)
        for key, (field, index) in TRAINING_ARGUMENT_FIELDS.items():
            label = field if index is None else f"{field}[{index}]"
            owned.append((key, "optimizer", training_argument_value(self.optimizer, key), label))
        for key, field in _OWNED_BY_SCHEDULER.items():
            owned.append((key, "scheduler", getattr(self.scheduler, field, None), field))
        for key, kind, value, label in owned:
            if key not in self.training:
                continue
            section = self.optimizer if kind == "optimizer" else self.scheduler
            if value is None:
                raise ConfigError(
                    f"training.{key}: {kind} {section.name!r} has no {label}; remove it from the training section"
                )
            if not _same(value, self.training[key]):
                raise ConfigError(
                    f"training.{key}={self.training[key]!r} conflicts with {kind}.{label}={value!r}: "
                    f"set it in the {kind} section only"
                )
        return self


# ---- loading --------------------------------------------------------------------------------


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"optimizer.lr=1e-3"`` -> ``(["optimizer", "lr"], 0.001)``; the value is read as a YAML scalar."""
    key, sep, raw = item.partition("=")
    path = [part for part in key.strip().split(".")]
    if not sep or not all(path):
        raise ConfigError(f"override {item!r}: expected KEY=VALUE with a dotted key, e.g. optimizer.lr=3e-4")
    return path, scalar(raw)


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides to a config mapping and return the new mapping.

    Setting ``optimizer.name`` or ``scheduler.name`` to a different name starts that section
    afresh from the new entry's defaults, plus the fields given on the same command line.
    """
    result = copy.deepcopy(dict(data))
    parsed = [parse_override(item) for item in overrides]
    for path, value in parsed:
        if len(path) == 2 and path[0] in ("optimizer", "scheduler") and path[1] == "name":
            section = result.get(path[0])
            current = section.get("name") if isinstance(section, Mapping) else section
            if current != value:
                result[path[0]] = {"name": value}
    for path, value in parsed:
        node = result
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if isinstance(child, str) and i == 0 and part in ("optimizer", "scheduler"):
                child = {"name": child}
            if child is None:
                child = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a mapping")
            node[part] = child
            node = child
        node[path[-1]] = value
    return result


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a mapping (``yaml.safe_load``: no tags that run code)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {str(path)!r} does not exist" + (" (it is a directory)" if path.is_dir() else "")
        )
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} must be a mapping of sections (model, data, training, optimizer, "
            f"scheduler, finetuning), not a {type(data).__name__}"
        )
    return data


def validate_config(data: Mapping[str, Any]) -> RunConfig:
    """Validate a config mapping into a :class:`RunConfig`, raising :class:`ConfigError` with one line per problem."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from None


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """Load a run config from a YAML file (or the defaults when ``path`` is None) plus overrides.

    Args:
        path: a YAML file with any of the sections model, data, training, optimizer,
            scheduler, finetuning; None for the embedded default run.
        overrides: ``"a.b=value"`` strings, applied in order.

    Raises:
        ConfigError: the file is missing or malformed, or a value is invalid.
    """
    data = read_yaml(path) if path is not None else {}
    return validate_config(apply_overrides(data, overrides))


def run_config_schema() -> dict[str, Any]:
    """The JSON Schema of the run config with every registered optimizer and scheduler, for editors."""
    from pydantic import create_model

    model = create_model(
        "RunConfig",
        __base__=RunConfig,
        optimizer=(registry.union("optimizer"), Field(default_factory=lambda: parse_optimizer(None))),
        scheduler=(registry.union("scheduler"), Field(default_factory=lambda: parse_scheduler(None))),
    )
    return model.model_json_schema()


def resolve_config(config: RunConfig | str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """A :class:`RunConfig` from a config object, a YAML file or None (the embedded default), plus overrides."""
    if isinstance(config, RunConfig):
        if not overrides:
            return config
        return validate_config(apply_overrides(config.model_dump(), overrides))
    if config is not None and not isinstance(config, (str, Path)):
        raise ConfigError(
            f"expected a RunConfig, a YAML file path or None, got {type(config).__name__}"
            + (": build one with optiplug.app.RunConfig(**mapping)" if isinstance(config, Mapping) else "")
        )
    return load_config(config, overrides)


def split_config_and_overrides(items: Sequence[str]) -> tuple[str | None, list[str]]:
    """``["run.yaml", "a.b=1"]`` -> ``("run.yaml", ["a.b=1"])``: an optional config file, then overrides."""
    if items and "=" not in items[0]:
        return items[0], list(items[1:])
    bad = [item for item in items if "=" not in item]
    if bad:
        raise ConfigError(f"expected KEY=VALUE overrides after the config file, got {bad[0]!r}")
    return None, list(items)
