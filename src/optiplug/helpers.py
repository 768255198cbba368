"""Deprecated module: its names moved to modules named for what they hold; import them from :mod:`optiplug`.

``optiplug.helpers`` was one module of plugin-author helpers. They are now in :mod:`optiplug.fields`
(``AdamFields``, ``Betas``, ``LearningRate``), :mod:`optiplug.kernel` (``Kernel``, ``kernel_kwargs``),
:mod:`optiplug.state_sizes` (``STEP_BYTES``, ``moment_bytes``, ``adam_state_bytes``, ``tensor_bytes``,
``optimizer_state_bytes``), :mod:`optiplug.unwrap` (``unwrap_optimizer``) and :mod:`optiplug.transformers_args`
(``TRAINING_ARGUMENT_FIELDS``), and every public one is a plain name on :mod:`optiplug`. This module re-exports
them so that a plugin written against it keeps working; new code should use ``optiplug.NAME``.
"""

from __future__ import annotations

from optiplug.fields import AdamFields, Betas, LearningRate
from optiplug.kernel import Kernel, kernel_kwargs
from optiplug.state_sizes import STEP_BYTES, adam_state_bytes, moment_bytes, optimizer_state_bytes, tensor_bytes
from optiplug.transformers_args import TRAINING_ARGUMENT_FIELDS, training_argument_value
from optiplug.unwrap import unwrap_optimizer

__all__ = [
    "STEP_BYTES",
    "TRAINING_ARGUMENT_FIELDS",
    "AdamFields",
    "Betas",
    "Kernel",
    "LearningRate",
    "adam_state_bytes",
    "kernel_kwargs",
    "moment_bytes",
    "optimizer_state_bytes",
    "tensor_bytes",
    "training_argument_value",
    "unwrap_optimizer",
]
