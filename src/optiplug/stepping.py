"""Optimizer bases for plugin authors: a per-parameter step, and a whole-matrix step that also runs sharded.

:class:`PerParameterOptimizer` — for an optimizer whose update of a parameter reads only that
parameter's gradient and state. You write ``step_parameters(group, params)``; the base gives
``step()`` (closure, then ``step_parameters`` once per group over the parameters that have a
gradient), and the parameter's position in the optimizer (:meth:`~PerParameterOptimizer.parameter_index`,
a stable seed). ``layerwise: true`` calls ``step_parameters(group, [p])`` from each gradient hook.

:class:`MatrixOptimizer` — for an optimizer that needs some parameters as whole matrices (an SVD,
Newton–Schulz, row or column statistics). You split each matrix's update in three:

1. ``matrix_input(p, grad, state, group)``: elementwise, on every process: what the matrix function
   needs (the gradient by default; Muon: its momentum);
2. ``matrix_update(p, matrix, state, group)``: the whole matrix in, the whole update out, with the
   matrix's own state (projections, low-rank moments): run **once** per matrix;
3. ``apply_update(p, update, state, group)``: elementwise, on every process: the update into the
   weights (learning rate, weight decay).

In one process and under DDP the three run in a row on each matrix. Under FSDP2 (``fully_shard``,
DTensor parameters) the base's ``step()`` runs them as :mod:`optiplug.sharded` describes: 1 and 3 on
each process's row shard, 2 on one owner process per matrix, owners balanced by size; the matrix's
state stays sharded like its parameter between steps, so the engine's optimizer state dict saves and
resumes it. Parameters you do not treat as matrices (``is_matrix`` False) go to
``step_elementwise(group, params)``, which under FSDP2 gets the DTensor parameters as they are
(elementwise torch ops work on them).

This module imports torch: import it (or ``optiplug.MatrixOptimizer``) inside your factory or your
optimizer module, never at your plugin's import time.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any, ClassVar

import torch

from optiplug.sharded import is_sharded, sharded_matrix_step

__all__ = ["MatrixOptimizer", "PerParameterOptimizer"]


def _evaluate(closure: Callable[[], Any] | None) -> Any:
    """The closure's loss (computed with gradients on, as torch's optimizers do), or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class PerParameterOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose ``step()`` is :meth:`step_parameters` over each group.

    Subclass it (or put it before an existing optimizer class among your bases: ``class
    MyAdam(optiplug.PerParameterOptimizer, SomeUpstreamAdam)``) and implement :meth:`step_parameters`.
    Declare ``per_parameter=True`` on the entry when, as this base assumes, each parameter's update
    reads only its own gradient and state.
    """

    def step_parameters(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """Update ``params`` by one step: all of them are in ``group`` and have a gradient.

        The whole step of each parameter (moments, projection, weight decay, its step counter):
        ``step()`` calls it once per group, ``layerwise: true`` once per parameter from its
        gradient hook, both under ``torch.no_grad()``. It must give the same result either way.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement step_parameters(group, params)")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step of every parameter that has a gradient (the others are left alone)."""
        loss = _evaluate(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self.step_parameters(group, params)
        return loss

    # ---- positions: stable per-parameter seeds ----
    def parameter_position(self, p: torch.Tensor) -> tuple[int, int, int]:
        """``(group index, index in the group, index in the optimizer)`` of ``p``.

        The index in the optimizer counts parameters across the groups in order, from 0: a seed
        derived from it is the same in every process, after a resume, and whichever subset of
        parameters a step updates. Groups added with ``add_param_group`` continue the count.
        """
        positions = self.__dict__.get("_optiplug_positions")
        if positions is None or p not in positions:
            positions = {}
            flat = 0
            for gindex, group in enumerate(self.param_groups):
                for pindex, param in enumerate(group["params"]):
                    positions[param] = (gindex, pindex, flat)
                    flat += 1
            self.__dict__["_optiplug_positions"] = positions
        return positions[p]

    def parameter_index(self, p: torch.Tensor) -> int:
        """``p``'s index in the optimizer (see :meth:`parameter_position`)."""
        return self.parameter_position(p)[2]


class MatrixOptimizer(PerParameterOptimizer):
    """An optimizer whose update of some parameters needs each whole matrix, one process or sharded (FSDP2).

    Implement :meth:`is_matrix`, :meth:`matrix_update` and :meth:`step_elementwise`; override
    :meth:`matrix_input` and :meth:`apply_update` when the defaults (the gradient in; ``p -= lr *
    update`` out) are not yours. Declare ``whole_matrices=True`` on the entry.

    State is ``self.state[p]``, keyed by the parameter as in every torch optimizer. Its keys are of
    two kinds:

    - **elementwise state**, named in :attr:`elementwise_state`: tensors shaped like the parameter
      (or 0-d), read and written by ``matrix_input``/``apply_update``; under FSDP2 each process
      keeps its shard and they are never gathered (Muon's momentum);
    - **matrix state**, every other key: tensors of any shape and Python numbers, read and written by
      ``matrix_update`` (projections, low-rank moments, a step counter). Under FSDP2 the owner gets
      them whole for the call; between steps every tensor is kept sharded like the parameter (a
      DTensor with its placements, cut along the same dimension; 0-d tensors replicated) and every
      number is the owner's, the same in every process.

    Attributes:
        last_step_matrices: matrices stepped by the latest ``step()`` (all processes count the same).
        last_step_matrix_updates: how many of them this process ran ``matrix_update`` for (under
            FSDP2 about 1/N of them; in one process, all).
    """

    elementwise_state: ClassVar[tuple[str, ...]] = ()
    """State keys ``matrix_input``/``apply_update`` keep per shard (shaped like the parameter, or 0-d)."""

    sharded_bucket_bytes: ClassVar[int] = 1 << 30
    """Under FSDP2, matrices are gathered in buckets of at most this many bytes of whole tensors (one at least)."""

    last_step_matrices: int = 0
    last_step_matrix_updates: int = 0

    def is_matrix(self, group: dict[str, Any], p: torch.Tensor) -> bool:
        """True when ``p`` (of ``group``) is updated as a whole matrix; the others go to :meth:`step_elementwise`."""
        raise NotImplementedError(f"{type(self).__name__} must implement is_matrix(group, p)")

    def matrix_input(
        self, p: torch.Tensor, grad: torch.Tensor, state: MutableMapping[str, Any], group: dict[str, Any]
    ) -> torch.Tensor:
        """Elementwise, on every process: the tensor :meth:`matrix_update` gets whole, shaped like ``p``.

        Under FSDP2, ``p`` and ``grad`` are this process's shards (plain tensors) and ``state`` holds
        the elementwise state's shards and the matrix state's numbers. Default: the gradient.
        """
        return grad

    def matrix_update(
        self, p: torch.Tensor, matrix: torch.Tensor, state: MutableMapping[str, Any], group: dict[str, Any]
    ) -> torch.Tensor:
        """The whole-matrix function: ``matrix`` (what :meth:`matrix_input` returned, whole) in, the update out.

        Run once per matrix per step: in one process on the parameter's own state; under FSDP2 on
        the matrix's owner process, with ``state`` holding the matrix state whole (create, replace
        or update its tensors and numbers freely; they go back to their shards after the call).

        Args:
            p: the parameter, for its identity only (a seed: ``self.parameter_index(p)``). Under FSDP2
                the owner holds just its own shard: never read ``p``'s values here.
            matrix: the whole matrix, shaped like the parameter.
            state: the matrix state (see the class docstring).
            group: the parameter's group.

        Returns:
            The whole update, shaped like the parameter; :meth:`apply_update` gets it (its shard). It
            is consumed before the next call, so it may be a buffer you reuse.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement matrix_update(p, matrix, state, group)")

    def apply_update(
        self, p: torch.Tensor, update: torch.Tensor, state: MutableMapping[str, Any], group: dict[str, Any]
    ) -> None:
        """Elementwise, on every process: apply ``update`` to ``p`` (both this process's shards under FSDP2).

        ``state`` as for :meth:`matrix_input`, with the numbers :meth:`matrix_update` just set.
        Default: ``p -= group["lr"] * update``.
        """
        p.add_(update, alpha=-group["lr"])

    def step_elementwise(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """Step the parameters of ``group`` that are not matrices (all with a gradient); DTensors under FSDP2."""
        raise NotImplementedError(
            f"{type(self).__name__} has parameters that are not matrices: implement step_elementwise(group, params)"
        )

    # ---- one process, DDP, layerwise ----
    @torch.no_grad()
    def step_parameters(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """Step ``params``: the matrices one by one through the three functions, the others elementwise."""
        matrices = [p for p in params if self.is_matrix(group, p)]
        others = [p for p in params if not self.is_matrix(group, p)]
        if others:
            self.step_elementwise(group, others)
        for p in matrices:
            self.step_matrix(group, p)

    def step_matrix(self, group: dict[str, Any], p: torch.Tensor) -> None:
        """One matrix in this process: input, whole-matrix update, apply."""
        grad = p.grad
        assert grad is not None, "stepping a parameter without a gradient"
        state = self.state[p]
        update = self.matrix_update(p, self.matrix_input(p, grad, state, group), state, group)
        self.apply_update(p, update, state, group)

    # ---- every step: local or sharded ----
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step: under FSDP2 the matrices through the sharded step, everything else as in one process."""
        loss = _evaluate(closure)
        sharded: list[tuple[dict[str, Any], torch.Tensor]] = []
        local_matrices = 0
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            spread = [p for p in params if is_sharded(p) and self.is_matrix(group, p)]
            spread_ids = {id(p) for p in spread}
            local = [p for p in params if id(p) not in spread_ids]
            if local:
                local_matrices += sum(1 for p in local if self.is_matrix(group, p))
                self.step_parameters(group, local)
            sharded.extend((group, p) for p in spread)
        updates = sharded_matrix_step(self, sharded) if sharded else 0
        self.last_step_matrices = local_matrices + len(sharded)
        self.last_step_matrix_updates = local_matrices + updates
        return loss
