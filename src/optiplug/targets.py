"""Which weight matrices a matrix optimizer (GaLore, APOLLO, ...) treats specially: ``target_modules``.

One rule for every plugin, the same for a model and for the bare parameter shapes ``state_bytes``
sees, selecting ``nn.Linear`` modules by name:

- ``"all-linear"``: every ``nn.Linear`` except the output head (as in PEFT);
- a string: a regex matched against the full module name (``re.fullmatch``);
- a list: a module is selected when an item occurs in its name or fully matches it as a regex
  (transformers' ``optim_target_modules`` rule, so the usual ``["attn", "mlp"]`` works).

A selection matching no ``nn.Linear`` is a :class:`ConfigError` naming the candidates. Declare
the field with the :data:`TargetModules` type to get its validation::

    target_modules: optiplug.TargetModules = "all-linear"

(LoRA's own ``finetuning.target_modules`` follows PEFT's rule instead: :func:`optiplug.params.match_modules`.)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

from pydantic import AfterValidator, Field

from optiplug.errors import ConfigError
from optiplug.params import ALL_LINEAR

if TYPE_CHECKING:
    from torch import nn

    from optiplug.context import ParamShape

__all__ = ["ALL_LINEAR", "TargetModules", "select_target_modules", "target_parameters", "target_shapes"]


def _valid_targets(value: str | list[str]) -> str | list[str]:
    message = "expected 'all-linear', a regex, or a non-empty list of module names"
    if isinstance(value, list):
        if not value or not all(isinstance(item, str) and item for item in value):
            raise ValueError(message)
        return value
    if not value:
        raise ValueError(message)
    if value != ALL_LINEAR:
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(f"not a valid regex: {error}") from None
    return value


TargetModules = Annotated[
    str | list[str],
    AfterValidator(_valid_targets),
    Field(
        description="Modules whose 2-D nn.Linear weights are targeted: 'all-linear' (every nn.Linear except the "
        "output head), a regex matched against the full module name, or a list (a module is selected when an item "
        "occurs in its name or fully matches it as a regex, as transformers' optim_target_modules)."
    ),
]
"""A ``target_modules`` field: ``"all-linear"``, a regex, or a list of name parts, validated."""


def _fullmatch(pattern: str, name: str) -> bool:
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def select_target_modules(
    names: Sequence[str], targets: str | Sequence[str], output_head: str | None = None
) -> list[str]:
    """The names among ``names`` (all ``nn.Linear`` module names) that ``targets`` selects.

    Raises:
        ConfigError: nothing is selected; the message lists the available module names.
    """
    if targets == ALL_LINEAR:
        chosen = [name for name in names if name != output_head]
    elif isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as error:
            raise ConfigError(f"target_modules: {targets!r} is not a valid regex: {error}") from None
        chosen = [name for name in names if pattern.fullmatch(name)]
    else:
        items = list(targets)
        chosen = [name for name in names if any(item in name or _fullmatch(item, name) for item in items)]
    if not chosen:
        available = sorted({name.rsplit(".", 1)[-1] for name in names})
        raise ConfigError(
            f"target_modules {targets!r} matches no nn.Linear module; "
            f"available: {', '.join(available) or '(none)'} (or 'all-linear')"
        )
    return chosen


def target_parameters(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Qualified names of the trainable 2-D ``nn.Linear`` weights of ``model`` that ``targets`` selects.

    Raises:
        ConfigError: nothing matches, or only frozen weights do.
    """
    from torch import nn

    linears = {name: module for name, module in model.named_modules() if name and isinstance(module, nn.Linear)}
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    head = next((name for name, module in linears.items() if module is output), None)
    chosen = select_target_modules(list(linears), targets, head)
    names = [
        f"{name}.weight" for name in chosen if linears[name].weight.requires_grad and linears[name].weight.dim() == 2
    ]
    if not names:
        raise ConfigError(
            f"target_modules {targets!r} selects only frozen weights ({', '.join(chosen[:4])}"
            f"{', ...' if len(chosen) > 4 else ''}); select trainable modules or unfreeze them"
        )
    return names


def target_shapes(shapes: Sequence[ParamShape], targets: str | Sequence[str]) -> set[str]:
    """Names of the parameters in ``shapes`` that ``targets`` selects (no model needed).

    The output head (excluded by ``all-linear``) is taken to be the last ``Linear`` weight whose
    output size equals an embedding's number of rows, which is what ``get_output_embeddings``
    returns for the transformers language models.
    """
    linear = [s for s in shapes if s.module_type == "Linear" and s.name.endswith(".weight") and len(s.shape) == 2]
    vocab = {s.shape[0] for s in shapes if s.module_type == "Embedding" and len(s.shape) == 2}
    heads = [s for s in linear if s.shape[0] in vocab]
    head = heads[-1].name.removesuffix(".weight") if heads else None
    modules = [s.name.removesuffix(".weight") for s in linear]
    return {f"{name}.weight" for name in select_target_modules(modules, targets, head)}
