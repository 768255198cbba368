"""optiplug: a pluggable optimizer and scheduler registry for transformers' Trainer.

Two layers. This package exports the plugin contract and the Trainer integration (configs, entries,
hookspecs, the registry, the helpers for plugin authors, the factory, the trainer mixin); the Trainer side is
imported on first use (``_LAZY``), so importing this package does not import torch or transformers. The app on top (the
run config, the main job, the CLI) is ``optiplug.app``: ``from optiplug.app import train, load_config``.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from typing import Any

from optiplug.configs import OptimizerConfig, SchedulerConfig
from optiplug.context import BuildContext, ParamShape, ScheduleContext
from optiplug.entries import (
    Alias,
    LazyConfig,
    OptimizerClass,
    OptimizerEntry,
    Registered,
    SchedulerEntry,
    lazy_attributes,
)
from optiplug.errors import (
    CheckpointError,
    ConfigError,
    DuplicateNameError,
    MissingDependencyError,
    OptiplugError,
    PluginError,
    UnknownNameError,
)
from optiplug.fields import AdamFields, Betas, LearningRate
from optiplug.hookspecs import hookimpl, hookspec
from optiplug.kernel import Kernel, kernel_kwargs
from optiplug.matrices import check_whole_matrices, count_shapes, fsdp_version, split_param_groups, split_shapes
from optiplug.params import GROUP_ROLE
from optiplug.patches import Patch
from optiplug.registry import (
    get_entry,
    get_scheduler_entry,
    list_optimizers,
    list_schedulers,
    parse_optimizer,
    parse_scheduler,
)
from optiplug.shapes import effective_rank, low_rank_shape, projection_sides, projector_numel
from optiplug.state_sizes import STEP_BYTES, adam_state_bytes, moment_bytes, optimizer_state_bytes, tensor_bytes
from optiplug.targets import TargetModules, select_target_modules, target_parameters, target_shapes
from optiplug.transformers_args import ADAM_ARGUMENTS, TRAINING_ARGUMENT_FIELDS, transformers_fields
from optiplug.unwrap import unwrap_optimizer

__version__ = "0.1.0"

# bitsandbytes (pulled in by transformers when installed) warns on every import on CPUs without an optional
# kernel package; it is irrelevant to optiplug users and would be the first line of every run.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _not_cuda_only_noise(record: logging.LogRecord) -> bool:
    """False for the lines torchao logs on every import on a machine without its CUDA extensions (transformers imports
    torchao whenever it is installed), and torch's note about the enums torchao registers; True for anything else."""
    message = record.getMessage()
    return not (message.startswith("Failed to load ") and ".so" in message) and "is an Enum subclass" not in message


logging.getLogger("torchao").addFilter(_not_cuda_only_noise)
logging.getLogger("torch.utils._pytree").addFilter(_not_cuda_only_noise)

_LAZY = {
    # the contract's Trainer side (imports transformers)
    "OptiTrainer": "optiplug.trainer",
    "OptiTrainerMixin": "optiplug.trainer",
    "SaveProcessorCallback": "optiplug.callbacks",
    "build_optimizer": "optiplug.factory",
    "build_scheduler": "optiplug.factory",
    "hf_factory": "optiplug.hf_route",
    "LayerwiseStepper": "optiplug.layerwise",
    "disable_layerwise": "optiplug.layerwise",
    "enable_layerwise": "optiplug.layerwise",
    "layerwise_stepper": "optiplug.layerwise",
    "MatrixOptimizer": "optiplug.stepping",
    "PerParameterOptimizer": "optiplug.stepping",
}

# The app's names this package exported up to 0.1: still reachable, with a DeprecationWarning, until 0.3.
# Import them from optiplug.app.
MOVED_TO_APP = frozenset(
    {
        "DataConfig",
        "FinetuningConfig",
        "ModelConfig",
        "PissaConvertCallback",
        "RunConfig",
        "RunResult",
        "apply_finetuning",
        "load_config",
        "train",
    }
)

__all__ = [
    "ADAM_ARGUMENTS",
    "GROUP_ROLE",
    "STEP_BYTES",
    "TRAINING_ARGUMENT_FIELDS",
    "AdamFields",
    "Alias",
    "Betas",
    "BuildContext",
    "CheckpointError",
    "ConfigError",
    "DuplicateNameError",
    "Kernel",
    "LayerwiseStepper",
    "LazyConfig",
    "LearningRate",
    "MatrixOptimizer",
    "MissingDependencyError",
    "OptiTrainer",
    "OptiTrainerMixin",
    "OptimizerClass",
    "OptimizerConfig",
    "OptimizerEntry",
    "OptiplugError",
    "ParamShape",
    "Patch",
    "PerParameterOptimizer",
    "PluginError",
    "Registered",
    "SaveProcessorCallback",
    "ScheduleContext",
    "SchedulerConfig",
    "SchedulerEntry",
    "TargetModules",
    "UnknownNameError",
    "adam_state_bytes",
    "build_optimizer",
    "build_scheduler",
    "check_whole_matrices",
    "count_shapes",
    "disable_layerwise",
    "effective_rank",
    "enable_layerwise",
    "fsdp_version",
    "get_entry",
    "get_scheduler_entry",
    "hf_factory",
    "hookimpl",
    "hookspec",
    "kernel_kwargs",
    "layerwise_stepper",
    "lazy_attributes",
    "list_optimizers",
    "list_schedulers",
    "low_rank_shape",
    "moment_bytes",
    "optimizer_state_bytes",
    "parse_optimizer",
    "parse_scheduler",
    "projection_sides",
    "projector_numel",
    "select_target_modules",
    "split_param_groups",
    "split_shapes",
    "target_parameters",
    "target_shapes",
    "tensor_bytes",
    "transformers_fields",
    "unwrap_optimizer",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in MOVED_TO_APP:
        warnings.warn(
            f"optiplug.{name} moved to the app: use `from optiplug.app import {name}` (optiplug.{name} goes in 0.3)",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module("optiplug.app"), name)
    raise AttributeError(f"module 'optiplug' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
