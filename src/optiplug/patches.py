"""Reversible patches, applied for the length of ``train()`` and undone on exit (also on error).

A patch sets an attribute on one *instance* reached from the trainer (``trainer.accelerator``,
say), never on a class, so two trainers in one process never see each other's patches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from optiplug.errors import PluginError

__all__ = ["Patch", "applied"]

_MISSING = object()


@dataclass(frozen=True)
class Patch:
    """Replace ``attribute`` of the object at ``target`` (a dotted path from the trainer).

    Attributes:
        target: dotted attribute path from the trainer, e.g. ``"accelerator"``; ``""`` is the trainer.
        attribute: the attribute to replace on that object, e.g. ``"clip_grad_norm_"``.
        make: ``make(obj, original) -> replacement``; ``original`` is the current value (bound
            method or attribute) so the replacement may wrap it.
        reason: one line saying why, shown in logs.
    """

    target: str
    attribute: str
    make: Callable[[Any, Any], Any]
    reason: str = ""

    def resolve(self, trainer: Any) -> Any:
        obj = trainer
        for part in filter(None, self.target.split(".")):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise PluginError(f"patch target {self.target!r} not found on {type(trainer).__name__}") from None
        return obj

    def apply(self, trainer: Any) -> Callable[[], None]:
        """Apply the patch and return the function that undoes it."""
        obj = self.resolve(trainer)
        saved = obj.__dict__.get(self.attribute, _MISSING) if hasattr(obj, "__dict__") else _MISSING
        original = getattr(obj, self.attribute)
        setattr(obj, self.attribute, self.make(obj, original))

        def undo() -> None:
            if saved is _MISSING:
                with contextlib.suppress(AttributeError):
                    delattr(obj, self.attribute)
            else:
                setattr(obj, self.attribute, saved)

        return undo


@contextlib.contextmanager
def applied(trainer: Any, patches: Sequence[Patch]) -> Iterator[None]:
    """Apply ``patches`` to ``trainer`` for the length of the block, undoing them in reverse order."""
    undo: list[Callable[[], None]] = []
    try:
        for patch in patches:
            undo.append(patch.apply(trainer))
        yield
    finally:
        for fn in reversed(undo):
            fn()
