"""Where the weights are when an engine steps a copy of them: DeepSpeed ZeRO's fp32 partitions.

Under DDP, one process or FSDP2, the optimizer steps the model's own parameters (FSDP2's are
DTensor shards of them), so the train/eval switch changes the model in place and every gathered
state dict sees it. DeepSpeed's ZeRO optimizers are different: the schedule-free optimizer inside
them steps fp32 *partitions*, flat copies of this rank's slice of the weights, and DeepSpeed copies
them into the model's weights only at the end of its own ``step()``. accelerate's ``eval()`` reaches
the schedule-free optimizer through DeepSpeed's wrapper, but the switch then changes only the fp32
copy: the model (what is evaluated, what ``save_model`` gathers) stays at y. And under ZeRO-3 the
optimizer's groups are empty between steps (DeepSpeed puts one fp32 partition in for each step), so
a switch there changes nothing at all.

:func:`engine_weights` gives the optimizer what it needs around a switch: ``exposed()``, inside
which its groups hold the fp32 partitions (ZeRO-3), and ``push()``, which copies them into the
model's weights the way DeepSpeed's step does (the partition of each rank, then the all-gather;
under ZeRO-3 into each rank's parameter partitions, then the persistent parameters). ``push()`` is
collective: every rank switches at the same points of the Trainer's loop, so every rank calls it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import optiplug

__all__ = ["EngineWeights", "ZeRO3Weights", "ZeROWeights", "engine_weights"]

# DeepSpeed's ZeRO-1/2 optimizer and its ZeRO-1 bf16 optimizer: both copy their fp32 partition into the
# model's flat weights and all-gather them in ``update_lp_params()``.
_UPDATE_LP_PARAMS = ("DeepSpeedZeroOptimizer", "BF16_Optimizer")
_STAGE3 = "DeepSpeedZeroOptimizer_Stage3"
NVME = (
    "DeepSpeed's NVMe offload swaps the weights out between steps, where the switch between the training point y "
    "and the saved weights x cannot reach them: offload to cpu or not at all"
)


class EngineWeights:
    """The model's weights are the optimizer's parameters: nothing to do around a switch."""

    @contextlib.contextmanager
    def exposed(self) -> Iterator[None]:
        yield

    def push(self) -> None:
        """Nothing to copy: the switch changed the model's weights in place."""


class ZeROWeights(EngineWeights):
    """DeepSpeed ZeRO-1/2 (and its ZeRO-1 bf16 optimizer): fp32 partitions, copied out by ``update_lp_params``."""

    def __init__(self, engine_optimizer: Any) -> None:
        self.engine_optimizer = engine_optimizer

    def push(self) -> None:
        self.engine_optimizer.update_lp_params()


class ZeRO3Weights(EngineWeights):
    """DeepSpeed ZeRO-3: fp32 partitions in the optimizer's groups only while DeepSpeed steps them."""

    def __init__(self, engine_optimizer: Any) -> None:
        self.engine_optimizer = engine_optimizer

    @contextlib.contextmanager
    def exposed(self) -> Iterator[None]:
        zero3 = self.engine_optimizer
        zero3._set_fp32_optimizer_param_groups()  # as DeepSpeed does around the base optimizer's state_dict
        try:
            yield
        finally:
            zero3._clear_fp32_optimizer_param_groups()

    def push(self) -> None:
        zero3 = self.engine_optimizer
        zero3.checkpoint_event_prologue()  # release every gathered parameter: they are rebuilt from the partitions
        for sub_group in range(len(zero3.fp16_groups)):
            zero3._reassign_or_swap_out_partitioned_parameters(sub_group)  # fp32 partition -> parameter partitions
        zero3.checkpoint_event_epilogue()  # gather the persistent (small, never released) parameters again


def _refuse(name: str, sentence: str) -> optiplug.ConfigError:
    return optiplug.ConfigError(f"{name}: {sentence}")


def engine_weights(name: str, engine_optimizer: Any) -> EngineWeights:
    """What the schedule-free optimizer ``name`` needs around a switch when ``engine_optimizer`` holds it.

    Args:
        name: the optimizer's registry name, for the refusals.
        engine_optimizer: the object whose ``.optimizer`` is the schedule-free optimizer (DeepSpeed's
            ZeRO optimizer), or None when accelerate's wrapper (or nothing) holds it directly.

    Raises:
        optiplug.ConfigError: an engine whose copy of the weights the switch cannot reach, or a ZeRO-3 set-up
            that splits one parameter group into several steps (the group's step count would advance more
            than once per step).
    """
    if engine_optimizer is None:
        return EngineWeights()
    kind = type(engine_optimizer).__name__
    if kind in _UPDATE_LP_PARAMS:
        return ZeROWeights(engine_optimizer)
    if kind == _STAGE3:
        if getattr(engine_optimizer, "swap_optimizer", False) or getattr(
            engine_optimizer, "params_in_nvme_and_cpu", False
        ):
            raise _refuse(
                name,
                "DeepSpeed ZeRO-3 with NVMe offload swaps the fp32 weights out between steps, and the switch between "
                "the training point y and the saved weights x cannot reach them there: offload to cpu or not at all",
            )
        groups = len(engine_optimizer.optimizer.param_groups)
        if len(engine_optimizer.fp16_groups) != groups:
            raise _refuse(
                name,
                f"DeepSpeed ZeRO-3 splits its {groups} parameter groups into {len(engine_optimizer.fp16_groups)} "
                "sub-groups and steps each one separately, which would advance schedule-free's per-group step count "
                "several times per step: raise zero_optimization.sub_group_size above the largest group's number of "
                "parameters",
            )
        return ZeRO3Weights(engine_optimizer)
    raise _refuse(
        name,
        f"the optimizer runs inside {kind}, which steps its own copy of the weights; the switch between the training "
        "point y and the saved weights x is wired for DeepSpeed ZeRO stages 1-3 only: train with DDP, FSDP or a "
        "DeepSpeed ZeRO stage from 1 to 3",
    )
