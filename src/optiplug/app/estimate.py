"""``optiplug estimate``: the memory a run needs for weights, gradients and optimizer state.

Nothing is allocated: the model is instantiated on torch's ``meta`` device from its
``config.json`` (the embedded model, a local directory, or a hub id whose ``config.json`` is
already in the local Hugging Face cache), the run's fine-tuning type (full, freeze or LoRA,
applied as training applies it) selects the trainable parameters, and each optimizer's entry
computes its state from the parameter shapes (``OptimizerEntry.state_bytes``). An entry without
``state_bytes`` is measured instead: its optimizer is built on the ``meta`` model and takes one step
on ``meta`` gradients (no memory is allocated), and the state it created is counted; the table
marks such a figure "(measured)". An optimizer that cannot step on ``meta`` shows "n/a", never a
guess.

Gradients are counted for every trainable parameter at the parameter's dtype, as a plain
training step holds them; activations, the data and framework buffers are not counted.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from optiplug.app.config import (
    EMBEDDED,
    FinetuningConfig,
    ModelConfig,
    RunConfig,
    load_config,
    resolve_config,
    split_config_and_overrides,
)
from optiplug.configs import OptimizerConfig
from optiplug.context import ParamShape
from optiplug.errors import ConfigError
from optiplug.registry import get_entry, parse_optimizer

if TYPE_CHECKING:
    from torch import nn

__all__ = ["Estimate", "ModelShapes", "command", "estimate", "estimate_shapes", "model_shapes", "resolve_model_dir"]


@dataclass(frozen=True)
class ModelShapes:
    """What the estimate needs from a model: every parameter's bytes and the trainable ones' shapes.

    Attributes:
        total_params: number of parameter elements (shared parameters counted once).
        weights_bytes: bytes of all parameters.
        trainable: the trainable parameters, as :class:`ParamShape`.
    """

    total_params: int
    weights_bytes: int
    trainable: tuple[ParamShape, ...]

    @property
    def trainable_params(self) -> int:
        return sum(s.numel for s in self.trainable)

    @property
    def gradient_bytes(self) -> int:
        return sum(s.numel * s.itemsize for s in self.trainable)

    @staticmethod
    def of_model(model: nn.Module) -> ModelShapes:
        """The shapes of ``model`` (on any device, ``meta`` included)."""
        params = list(model.parameters())
        return ModelShapes(
            total_params=sum(p.numel() for p in params),
            weights_bytes=sum(p.numel() * p.element_size() for p in params),
            trainable=tuple(ParamShape.of_model(model)),
        )


@dataclass(frozen=True)
class Estimate:
    """One optimizer's memory estimate, in bytes. ``state_bytes``/``total_bytes`` are None when unknown.

    ``state_source`` says where ``state_bytes`` came from: ``"analytic"`` (the entry's ``state_bytes``),
    ``"measured"`` (one step on the meta model), or None (unknown).
    """

    optimizer: str
    weights_bytes: int
    gradient_bytes: int
    state_bytes: int | None
    total_bytes: int | None
    total_params: int
    trainable_params: int
    state_source: str | None = None
    detail: str | None = None


# ---- the model, on the meta device ----------------------------------------------------------


def _embedded_model_dir() -> Path:
    import importlib.resources

    return Path(str(importlib.resources.files("optiplug") / "assets" / "model"))


def resolve_model_dir(model: ModelConfig) -> Path:
    """The directory holding ``model``'s ``config.json``, found without any network access.

    Raises:
        ConfigError: not the embedded model, not a local model directory, and not in the local cache.
    """
    name = model.name_or_path
    if name == EMBEDDED:
        path = _embedded_model_dir()
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"the embedded model is missing from this installation ({path / 'config.json'}): reinstall optiplug"
            )
        return path
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.name_or_path: the directory {name!r} has no config.json")
        return path
    if path.exists():
        raise ConfigError(f"model.name_or_path: {name!r} is a file; expected a model directory or a hub id")
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name:  # a path, not a hub id
        raise ConfigError(f"model.name_or_path: the directory {name!r} does not exist")
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        found = try_to_load_from_cache(name, "config.json")
    except HFValidationError:
        found = None
    if isinstance(found, str):
        return Path(found).parent
    raise ConfigError(
        f"model.name_or_path: {name!r} is neither a local directory nor a hub id whose config.json is in the "
        f"local cache ({constants.HF_HUB_CACHE}); estimate never downloads: run `hf download {name} config.json` "
        f"first or give a local model directory"
    )


def meta_model(model: ModelConfig, finetuning: FinetuningConfig | None = None) -> nn.Module:
    """``model`` on the ``meta`` device in its configured dtype (no memory, no weights read), with
    ``finetuning`` applied: frozen parameters, or a LoRA adapter (also on ``meta``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from optiplug.app.adapters import apply_finetuning

    path = resolve_model_dir(model)
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=model.trust_remote_code, local_files_only=True)
        with torch.device("meta"):
            built = AutoModelForCausalLM.from_config(
                config, dtype=getattr(torch, model.dtype), trust_remote_code=model.trust_remote_code
            )
    except (ValueError, OSError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"model.name_or_path: cannot build a causal language model from {path}: {first}") from None
    if finetuning is not None and finetuning.type == "lora":
        # the adapter's shapes do not depend on its initialisation, and PiSSA's SVD cannot run on meta
        finetuning = finetuning.model_copy(update={"init": "default", "pissa_convert": False})
    with torch.device("meta"):
        return apply_finetuning(built, finetuning)


def model_shapes(config: RunConfig) -> ModelShapes:
    """The parameter shapes of the run's model with its fine-tuning type applied, built on ``meta``."""
    return ModelShapes.of_model(meta_model(config.model, config.finetuning))


# ---- the estimate ---------------------------------------------------------------------------


def _optimizer_configs(
    config: RunConfig, optimizers: Sequence[OptimizerConfig | str | Mapping[str, Any]] | None
) -> list[OptimizerConfig]:
    if not optimizers:
        return [config.optimizer]
    configs = []
    for item in optimizers:
        if isinstance(item, str) and item == config.optimizer.name:
            configs.append(config.optimizer)  # the run's own optimizer keeps its configured fields
        else:
            configs.append(parse_optimizer(item))
    return configs


def measured_on_meta(model: nn.Module, cfg: OptimizerConfig) -> int | None:
    """State bytes of ``cfg``'s optimizer after one step on ``model``'s ``meta`` parameters, or None.

    The optimizer is built as training builds it, every trainable parameter gets a ``meta`` gradient,
    and ``step()`` runs: the state it creates is counted without allocating it. None when the
    optimizer cannot be built or stepped on ``meta`` (an optimizer reading a value back with
    ``.item()``, say): the figure is then unknown, not guessed.
    """
    import torch

    from optiplug.context import BuildContext
    from optiplug.factory import build_from_entry
    from optiplug.helpers import optimizer_state_bytes

    params = [p for p in model.parameters() if p.requires_grad]
    if not params or any(p.device.type != "meta" for p in params):
        return None
    try:
        optimizer = build_from_entry(get_entry(cfg.name), BuildContext(model=model), cfg)
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        return optimizer_state_bytes(optimizer)
    except Exception:  # any failure on meta means "not measurable here": reported as n/a, never guessed
        return None
    finally:
        for p in params:
            p.grad = None


def estimate_shapes(
    shapes: ModelShapes,
    optimizers: Sequence[OptimizerConfig],
    model: nn.Module | None = None,
    accumulation_steps: int = 1,
) -> list[Estimate]:
    """One :class:`Estimate` per optimizer config for the model described by ``shapes``.

    With ``layerwise: true`` and no gradient accumulation, each gradient is freed as soon as its
    parameter steps, so the gradient figure is the largest single parameter's; with accumulation
    every gradient lives until the boundary, as in a plain step.

    ``model``, the same model on the ``meta`` device, lets entries without ``state_bytes`` be measured.
    """
    rows = []
    for cfg in optimizers:
        entry = get_entry(cfg.name)
        state, source = None, None
        if entry.state_bytes is not None:
            try:
                state, source = int(entry.state_bytes(shapes.trainable, cfg)), "analytic"
            except Exception as error:  # one entry that cannot size a setting must not hide the other rows
                problem = f"{type(error).__name__}: {error}"
                warnings.warn(f"optiplug: {cfg.name}: state_bytes failed ({problem}); shown as n/a", stacklevel=2)
        elif model is not None:
            state = measured_on_meta(model, cfg)
            source = "measured" if state is not None else None
        grads = shapes.gradient_bytes if entry.grad_bytes is None else int(entry.grad_bytes(shapes.trainable, cfg))
        if getattr(cfg, "layerwise", False) is True and accumulation_steps == 1 and shapes.trainable:
            grads = min(grads, max(s.numel * s.itemsize for s in shapes.trainable))
        fixed = shapes.weights_bytes + grads
        rows.append(
            Estimate(
                optimizer=cfg.name,
                weights_bytes=shapes.weights_bytes,
                gradient_bytes=grads,
                state_bytes=state,
                total_bytes=None if state is None else fixed + state,
                total_params=shapes.total_params,
                trainable_params=shapes.trainable_params,
                state_source=source,
                detail=entry.describe(shapes.trainable, cfg) if entry.describe is not None else None,
            )
        )
    return rows


def estimate(
    config: RunConfig | str | Path | None = None,
    optimizers: Sequence[OptimizerConfig | str | Mapping[str, Any]] | None = None,
    overrides: Sequence[str] = (),
) -> list[Estimate]:
    """Estimate weights, gradient and optimizer-state memory of a run, per optimizer.

    Args:
        config: a :class:`RunConfig`, a YAML file, or None for the embedded default run.
        optimizers: optimizers to compare (names, mappings or configs); by default the run's own.
            A bare name equal to the run's optimizer keeps the run's configured fields.
        overrides: ``"a.b=value"`` strings applied on top of ``config``.

    Raises:
        ConfigError: the model cannot be found offline, or a config value is invalid.
        UnknownNameError: an optimizer name is not registered.
    """
    config = resolve_config(config, overrides)
    configs = _optimizer_configs(config, optimizers)  # unknown names fail before the model is built
    model = meta_model(config.model, config.finetuning)
    accumulation = int(config.training.get("gradient_accumulation_steps", 1) or 1)
    return estimate_shapes(ModelShapes.of_model(model), configs, model, accumulation)


# ---- the command ----------------------------------------------------------------------------


def format_bytes(value: int | None) -> str:
    """``1234567890`` -> ``"1.15 GiB"``; None -> ``"n/a"``."""
    if value is None:
        return "n/a"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _format_count(value: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return str(value)


def _print_table(rows: list[Estimate], config: RunConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    first = rows[0]
    console = Console()
    console.print(
        f"{config.model.name_or_path} ({config.model.dtype}, {config.finetuning.type} fine-tuning): "
        f"{_format_count(first.total_params)} parameters, {_format_count(first.trainable_params)} trainable",
        soft_wrap=True,
        highlight=False,
        markup=False,
    )
    table = Table()
    table.add_column("optimizer")
    for column in ("weights", "gradients", "optimizer state", "total"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row.optimizer,
            format_bytes(row.weights_bytes),
            format_bytes(row.gradient_bytes),
            format_bytes(row.state_bytes) + (" (measured)" if row.state_source == "measured" else ""),
            format_bytes(row.total_bytes),
        )
    console.print(table)
    for row in rows:
        if row.detail:
            console.print(f"{row.optimizer}: {row.detail}", soft_wrap=True, highlight=False, markup=False)


def command(
    items: list[str] | None = typer.Argument(
        None,
        metavar="[CONFIG] [KEY=VALUE]...",
        help="A YAML run config (default: the embedded tiny run), then overrides.",
    ),
    optimizers: str | None = typer.Option(
        None, "--optimizers", help="Comma-separated optimizer names to compare (default: the config's optimizer)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Estimate weights, gradient and optimizer-state memory of a run without allocating it.

    The model is built on the meta device from its config.json: no weights are read, nothing is downloaded.
    Gradients count every trainable parameter; activations are not counted.

    Examples: `optiplug estimate examples/adamw.yaml --optimizers adamw,sgd`,
    `optiplug estimate model.dtype=bfloat16 --json`.
    """
    path, overrides = split_config_and_overrides(list(items or []))
    config = load_config(path, overrides)
    names = [name.strip() for name in optimizers.split(",") if name.strip()] if optimizers else None
    if optimizers is not None and not names:
        raise ConfigError("--optimizers: expected comma-separated optimizer names, e.g. --optimizers adamw,sgd")
    rows = estimate(config, names)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "model": config.model.name_or_path,
                    "dtype": config.model.dtype,
                    "finetuning": config.finetuning.type,
                    "estimates": [asdict(r) for r in rows],
                },
                indent=2,
            )
        )
        return
    _print_table(rows, config)
