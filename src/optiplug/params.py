"""Parameter selection shared by plugins: decay/no-decay groups and target-module matching."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from optiplug.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["ALL_LINEAR", "decay_parameter_names", "match_modules", "param_groups"]

ALL_LINEAR = "all-linear"

# The same rule as transformers' Trainer.get_decay_parameter_names, so groups match a plain Trainer.
_NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get weight decay: not biases, not norms (as transformers decides)."""
    from torch import nn
    from transformers.trainer_pt_utils import get_parameter_names

    return set(get_parameter_names(model, [nn.LayerNorm], _NO_DECAY_PATTERNS))


def param_groups(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    decay_names: set[str],
    weight_decay: float,
    **options: Any,
) -> list[dict[str, Any]]:
    """Two groups, decay then no-decay, of the trainable parameters (empty groups are dropped).

    ``options`` (``lr=...``, ...) are added to both groups.
    """
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in named_parameters:
        if param.requires_grad:
            (decay if name in decay_names else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, **options},
        {"params": no_decay, "weight_decay": 0.0, **options},
    ]
    return [group for group in groups if group["params"]]


def match_modules(
    model: nn.Module, targets: str | Sequence[str], *, module_types: tuple[type, ...] | None = None
) -> list[str]:
    """Names of the modules of ``model`` selected by ``targets``.

    Args:
        targets: ``"all-linear"`` (every ``nn.Linear`` except the output head), a regex matched
            against the full module name (``re.fullmatch``), or a list of names: a module is
            selected when its name equals an item or ends with ``"." + item``.
        module_types: only modules of these types count (default ``nn.Linear``).

    Raises:
        ConfigError: nothing matched; the message names the candidate modules.
    """
    from torch import nn

    module_types = module_types or (nn.Linear,)
    candidates = [(name, m) for name, m in model.named_modules() if name and isinstance(m, module_types)]
    if targets == ALL_LINEAR:
        output = getattr(model, "get_output_embeddings", lambda: None)()
        chosen = [name for name, m in candidates if m is not output]
    elif isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as error:
            raise ConfigError(f"target_modules: {targets!r} is not a valid regex: {error}") from None
        chosen = [name for name, _ in candidates if pattern.fullmatch(name)]
    else:
        items = list(targets)
        chosen = [name for name, _ in candidates if any(name == t or name.endswith("." + t) for t in items)]
    if not chosen:
        suffixes = sorted({name.rsplit(".", 1)[-1] for name, _ in candidates})
        raise ConfigError(
            f"target_modules {targets!r} matches no {'/'.join(t.__name__ for t in module_types)} module; "
            f"available: {', '.join(suffixes) or '(none)'} (or 'all-linear')"
        )
    return chosen
