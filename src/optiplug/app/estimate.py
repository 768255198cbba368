"""``optiplug estimate``: the memory a run needs for weights, gradients and optimizer state.

Nothing is allocated: the model is instantiated on torch's ``meta`` device from its
``config.json`` (the embedded model, a local directory, or a hub id whose ``config.json`` is
already in the local Hugging Face cache), the run's fine-tuning type (full, freeze or LoRA,
applied as training applies it) selects the trainable parameters, and each optimizer's entry
gives its state for the parameter shapes (``OptimizerEntry.state_bytes``: a formula of the shapes, or
the entry's own measurement without allocating, as the pytorch-optimizer bridge's). An entry without
``state_bytes`` is measured instead: its optimizer is built on the ``meta`` model and takes one step
on ``meta`` gradients (no memory is allocated), and the state it created is counted; the table
marks such a figure "(measured)". An optimizer that cannot step on ``meta`` shows "n/a", never a
guess, and a warning line says why (the exception its build or step raised).

Gradients are counted for every trainable parameter at the parameter's dtype, as a plain
training step holds them; activations, the data and framework buffers are not counted.

With several processes (``--nproc N --engine ENGINE``) every figure is one process's: DDP keeps
everything whole in each; DeepSpeed ZeRO-1 shards the optimizer state, ZeRO-2 the gradients too,
ZeRO-3 and FSDP the weights too, each process holding 1/N (FSDP's last process less when a weight's
rows do not divide evenly; DeepSpeed pads its flat partitions by a few elements). Weights gathered
for a layer's forward and backward are not counted. The entry's check runs for the engine too: an
optimizer the engine's check refuses is marked, with the sentence.
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

__all__ = [
    "ENGINES",
    "Estimate",
    "ModelShapes",
    "command",
    "engine_check",
    "estimate",
    "estimate_shapes",
    "model_shapes",
    "resolve_model_dir",
]

ENGINES = ("ddp", "zero1", "zero2", "zero3", "fsdp")
"""What ``--engine`` takes: DDP, DeepSpeed ZeRO stages 1-3, FSDP (version 2, ``fully_shard``)."""
# What each engine cuts into 1/N per process: (weights, gradients, optimizer state)
_SHARDS = {
    "ddp": (False, False, False),
    "zero1": (False, False, True),
    "zero2": (False, True, True),
    "zero3": (True, True, True),
    "fsdp": (True, True, True),
}


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

    ``state_source`` says where ``state_bytes`` came from: ``"entry"`` (the entry's ``state_bytes``: a
    formula of the shapes, or the entry's own measurement, as the pytorch-optimizer bridge's),
    ``"measured"`` (the entry has none: its optimizer took one step on the meta model here), or None
    (unknown). The bytes are one process's of ``processes`` under ``engine``; ``engine_check`` is ``"refused:
    <sentence>"`` when ``train`` would refuse the optimizer for this model (one process) or under this launch,
    else None with one process, ``"passed"`` or ``"skipped: <why>"``.
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
    processes: int = 1
    engine: str = "ddp"
    engine_check: str | None = None


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
    ``.item()``, say): the figure is then unknown, not guessed, and a warning says why (the exception).
    """
    import torch

    from optiplug.context import BuildContext
    from optiplug.factory import build_from_entry
    from optiplug.state_sizes import optimizer_state_bytes

    params = [p for p in model.parameters() if p.requires_grad]
    if not params or any(p.device.type != "meta" for p in params):
        return None
    try:
        optimizer = build_from_entry(get_entry(cfg.name), BuildContext(model=model), cfg)
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        return optimizer_state_bytes(optimizer)
    except Exception as error:  # not measurable here: n/a, never guessed, and the reason is shown
        problem = f"{type(error).__name__}: {error}".strip().splitlines()[0]
        warnings.warn(f"optiplug: {cfg.name}: cannot be measured on meta ({problem}); shown as n/a", stacklevel=2)
        return None
    finally:
        for p in params:
            p.grad = None


def _launch_arguments(processes: int, engine: str, accumulation_steps: int, max_grad_norm: float) -> Any:
    """The ``TrainingArguments`` fields the entries' checks read, for ``processes`` under ``engine``."""
    from types import SimpleNamespace

    stage = int(engine[-1]) if engine.startswith("zero") else None
    return SimpleNamespace(
        world_size=processes,
        deepspeed={"zero_optimization": {"stage": stage}} if stage is not None else None,
        hf_deepspeed_config=None,
        fsdp="full_shard" if engine == "fsdp" else "",
        fsdp_config={"version": 2} if engine == "fsdp" else {},
        gradient_accumulation_steps=accumulation_steps,
        max_grad_norm=max_grad_norm,
        lr_scheduler_type="constant",
        warmup_steps=0,
        warmup_ratio=0.0,
        fp16=False,
        bf16=False,
    )


def engine_check(
    model: nn.Module,
    cfg: OptimizerConfig,
    processes: int,
    engine: str,
    accumulation_steps: int = 1,
    max_grad_norm: float = 1.0,
) -> str | None:
    """The checks a build runs (:func:`optiplug.factory.check_optimizer`, the one check path, which ``train`` runs
    before its first step) on the meta model, in one process and under ``engine`` with ``processes`` processes:
    ``"refused: <sentence>"`` when either refuses (a LoRA model for muon, say), else None for one process,
    ``"passed"`` or ``"skipped: <why>"``."""
    from optiplug.context import BuildContext
    from optiplug.factory import check_optimizer

    entry = get_entry(cfg.name)
    launches = [(1, "ddp")] if processes == 1 else [(1, "ddp"), (processes, engine)]
    for launch in launches:
        try:
            ctx = BuildContext(model=model, args=_launch_arguments(*launch, accumulation_steps, max_grad_norm))
            check_optimizer(entry, ctx, cfg)
        except ConfigError as error:
            return f"refused: {error}"
        except Exception as error:  # a check that needs what a meta model or these arguments lack
            return None if processes == 1 else f"skipped: {type(error).__name__}: {error}"
    return None if processes == 1 else "passed"


def _share(value: int, processes: int, sharded: bool) -> int:
    return -(-value // processes) if sharded else value


def estimate_shapes(
    shapes: ModelShapes,
    optimizers: Sequence[OptimizerConfig],
    model: nn.Module | None = None,
    accumulation_steps: int = 1,
    processes: int = 1,
    engine: str = "ddp",
    max_grad_norm: float = 1.0,
) -> list[Estimate]:
    """One :class:`Estimate` per optimizer config for the model described by ``shapes``.

    With ``layerwise: true`` and no gradient accumulation, each gradient is freed as soon as its
    parameter steps, so the gradient figure is the largest single parameter's; with accumulation
    every gradient lives until the boundary, as in a plain step.

    ``model``, the same model on the ``meta`` device, lets entries without ``state_bytes`` be measured,
    and the entries' checks run for ``engine``. The figures are one process's of ``processes``.

    Raises:
        ConfigError: ``processes`` below 1 or an unknown ``engine``.
    """
    if processes < 1:
        raise ConfigError(f"--nproc must be at least 1, got {processes}")
    if engine not in _SHARDS:
        raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    cut_weights, cut_grads, cut_state = _SHARDS[engine]
    rows = []
    for cfg in optimizers:
        entry = get_entry(cfg.name)
        state, source = None, None
        if entry.state_bytes is not None:
            try:
                state, source = int(entry.state_bytes(shapes.trainable, cfg)), "entry"
            except Exception as error:  # one entry that cannot size a setting must not hide the other rows
                problem = f"{type(error).__name__}: {error}"
                warnings.warn(f"optiplug: {cfg.name}: state_bytes failed ({problem}); shown as n/a", stacklevel=2)
        elif model is not None:
            state = measured_on_meta(model, cfg)
            source = "measured" if state is not None else None
        grads = shapes.gradient_bytes if entry.grad_bytes is None else int(entry.grad_bytes(shapes.trainable, cfg))
        if getattr(cfg, "layerwise", False) is True and accumulation_steps == 1 and shapes.trainable:
            grads = min(grads, max(s.numel * s.itemsize for s in shapes.trainable))
        weights = _share(shapes.weights_bytes, processes, cut_weights)
        grads = _share(grads, processes, cut_grads)
        state = None if state is None else _share(state, processes, cut_state)
        rows.append(
            Estimate(
                optimizer=cfg.name,
                weights_bytes=weights,
                gradient_bytes=grads,
                state_bytes=state,
                total_bytes=None if state is None else weights + grads + state,
                total_params=shapes.total_params,
                trainable_params=shapes.trainable_params,
                state_source=source,
                detail=entry.describe(shapes.trainable, cfg) if entry.describe is not None else None,
                processes=processes,
                engine=engine,
                engine_check=None
                if model is None
                else engine_check(model, cfg, processes, engine, accumulation_steps, max_grad_norm),
            )
        )
    return rows


def estimate(
    config: RunConfig | str | Path | None = None,
    optimizers: Sequence[OptimizerConfig | str | Mapping[str, Any]] | None = None,
    overrides: Sequence[str] = (),
    processes: int = 1,
    engine: str = "ddp",
) -> list[Estimate]:
    """Estimate weights, gradient and optimizer-state memory of a run, per optimizer (one process's).

    Args:
        config: a :class:`RunConfig`, a YAML file, or None for the embedded default run.
        optimizers: optimizers to compare (names, mappings or configs); by default the run's own.
            A bare name equal to the run's optimizer keeps the run's configured fields.
        overrides: ``"a.b=value"`` strings applied on top of ``config``.
        processes: the number of training processes.
        engine: one of :data:`ENGINES` (what it shards: see the module).

    Raises:
        ConfigError: the model cannot be found offline, or a config value is invalid.
        UnknownNameError: an optimizer name is not registered.
    """
    config = resolve_config(config, overrides)
    configs = _optimizer_configs(config, optimizers)  # unknown names fail before the model is built
    model = meta_model(config.model, config.finetuning)
    accumulation = int(config.training.get("gradient_accumulation_steps", 1) or 1)
    clipping = float(config.training.get("max_grad_norm", 1.0) or 0.0)
    return estimate_shapes(ModelShapes.of_model(model), configs, model, accumulation, processes, engine, clipping)


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


_ENGINE_NAMES = {
    "ddp": "DDP",
    "zero1": "DeepSpeed ZeRO-1",
    "zero2": "DeepSpeed ZeRO-2",
    "zero3": "DeepSpeed ZeRO-3",
    "fsdp": "FSDP",
}


def _print_table(rows: list[Estimate], config: RunConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    first = rows[0]
    console = Console()
    launch = "" if first.processes == 1 else f"; per process of {first.processes} under {_ENGINE_NAMES[first.engine]}"
    console.print(
        f"{config.model.name_or_path} ({config.model.dtype}, {config.finetuning.type} fine-tuning): "
        f"{_format_count(first.total_params)} parameters, {_format_count(first.trainable_params)} trainable{launch}",
        soft_wrap=True,
        highlight=False,
        markup=False,
    )
    table = Table()
    table.add_column("optimizer")
    for column in ("weights", "gradients", "optimizer state", "total"):
        table.add_column(column, justify="right")
    for row in rows:
        refused = (row.engine_check or "").startswith("refused")
        table.add_row(
            row.optimizer,
            format_bytes(row.weights_bytes),
            format_bytes(row.gradient_bytes),
            format_bytes(row.state_bytes) + (" (measured)" if row.state_source == "measured" else ""),
            "refused" if refused else format_bytes(row.total_bytes),
        )
    console.print(table)
    for row in rows:
        if row.detail:
            console.print(f"{row.optimizer}: {row.detail}", soft_wrap=True, highlight=False, markup=False)
    for row in rows:
        if row.engine_check is not None and row.engine_check != "passed":
            console.print(f"{row.optimizer}: {row.engine_check}", soft_wrap=True, highlight=False, markup=False)


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
    nproc: int = typer.Option(1, "--nproc", help="Training processes: the figures become one process's."),
    engine: str = typer.Option(
        "ddp", "--engine", help="What shards across the processes: ddp, zero1, zero2, zero3 (DeepSpeed) or fsdp."
    ),
) -> None:
    """Estimate weights, gradient and optimizer-state memory of a run without allocating it.

    The model is built on the meta device from its config.json: no weights are read, nothing is downloaded.
    Gradients count every trainable parameter; activations are not counted.

    With `--nproc N --engine ENGINE` the figures are one process's: ZeRO-1 shards the optimizer state,
    ZeRO-2 the gradients too, ZeRO-3 and FSDP the weights too; DDP nothing. Optimizers the engine refuses
    are marked, with the reason.

    Examples: `optiplug estimate examples/adamw.yaml --optimizers adamw,sgd`,
    `optiplug estimate model.dtype=bfloat16 --json`,
    `optiplug estimate --optimizers adamw,muon --nproc 8 --engine fsdp`.
    """
    path, overrides = split_config_and_overrides(list(items or []))
    config = load_config(path, overrides)
    names = [name.strip() for name in optimizers.split(",") if name.strip()] if optimizers else None
    if optimizers is not None and not names:
        raise ConfigError("--optimizers: expected comma-separated optimizer names, e.g. --optimizers adamw,sgd")
    rows = estimate(config, names, processes=nproc, engine=engine)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "model": config.model.name_or_path,
                    "dtype": config.model.dtype,
                    "finetuning": config.finetuning.type,
                    "processes": nproc,
                    "engine": engine,
                    "estimates": [asdict(r) for r in rows],
                },
                indent=2,
            )
        )
        return
    _print_table(rows, config)
