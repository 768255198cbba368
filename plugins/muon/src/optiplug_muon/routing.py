"""Which parameters Muon trains and which AdamW does: one rule for a model and for bare shapes.

No torch here: ``state_bytes`` (``optiplug estimate``) routes :class:`optiplug.ParamShape`
descriptions with the same function the factory uses on the model.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import optiplug

MUON, ADAMW = "muon", "adamw"

# transformers' Conv1D (GPT-2) stores its weight as (fan_in, fan_out), the transpose of nn.Linear's.
TRANSPOSED_MODULES = frozenset({"Conv1D"})


def destination(shape: optiplug.ParamShape, patterns: Sequence[str], heads: Collection[str] = ()) -> tuple[str, str]:
    """``(MUON or ADAMW, reason)`` for one trainable parameter.

    Args:
        shape: the parameter (name, shape, owning module type).
        patterns: ``adamw_patterns``: regexes searched in the name that keep it on AdamW.
        heads: names of output-head parameters known from the model (``get_output_embeddings``).
    """
    if len(shape.shape) != 2:
        return ADAMW, f"{len(shape.shape)}-D"
    if shape.module_type == "Embedding":
        return ADAMW, "embedding"
    if shape.name in heads:
        return ADAMW, "output head"
    for pattern in patterns:
        if re.search(pattern, shape.name):
            return ADAMW, f"matches {pattern!r}"
    return MUON, "2-D hidden matrix"


@dataclass(frozen=True)
class Routing:
    """The split of a model's trainable parameters between Muon and AdamW."""

    muon: tuple[optiplug.ParamShape, ...]
    adamw: tuple[optiplug.ParamShape, ...]

    @staticmethod
    def of(shapes: Sequence[optiplug.ParamShape], patterns: Sequence[str], heads: Collection[str] = ()) -> Routing:
        """Route ``shapes`` (in order) with :func:`destination`."""
        muon: list[optiplug.ParamShape] = []
        adamw: list[optiplug.ParamShape] = []
        for shape in shapes:
            (muon if destination(shape, patterns, heads)[0] == MUON else adamw).append(shape)
        return Routing(tuple(muon), tuple(adamw))

    def summary(self) -> str:
        """``muon: 14 matrices (0.43M parameters) · adamw: 5 tensors (0.26M)``."""
        muon = sum(s.numel for s in self.muon)
        adamw = sum(s.numel for s in self.adamw)
        return (
            f"muon: {len(self.muon)} {'matrix' if len(self.muon) == 1 else 'matrices'} ({_millions(muon)} parameters)"
            f" · adamw: {len(self.adamw)} {'tensor' if len(self.adamw) == 1 else 'tensors'} ({_millions(adamw)})"
        )


def fans(module_type: str, dims: Sequence[int]) -> tuple[int, int]:
    """``(fan_out, fan_in)`` of a 2-D weight of a ``module_type`` module (transformers' Conv1D stores the transpose)."""
    rows, cols = int(dims[0]), int(dims[1])
    return (cols, rows) if module_type in TRANSPOSED_MODULES else (rows, cols)


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n < 1e7 else f"{n / 1e6:.1f}M"
