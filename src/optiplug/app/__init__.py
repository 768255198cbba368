"""The app on top of the contract: the run config, the main job, the ``optiplug`` command.

Python users of the whole job import it from here::

    from optiplug.app import RunConfig, load_config, train

The names are imported on first use, so ``import optiplug.app`` (and ``optiplug list``) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "RunConfig": "optiplug.app.config",
    "ModelConfig": "optiplug.app.config",
    "DataConfig": "optiplug.app.config",
    "FinetuningConfig": "optiplug.app.config",
    "load_config": "optiplug.app.config",
    "train": "optiplug.app.run",
    "RunResult": "optiplug.app.run",
    "apply_finetuning": "optiplug.app.adapters",
    "PissaConvertCallback": "optiplug.app.adapters",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'optiplug.app' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
