"""The trainer callback BAdam needs: badam's own ``BAdamCallback``, plus logging and clean-up."""

from __future__ import annotations

import logging
from typing import Any

from badam import BAdamCallback

import optiplug

# A child of the Trainer's own logger: switches show where and when the Trainer's info lines do
# (``training.log_level: info``), through transformers' handler.
logger = logging.getLogger("transformers.trainer.badam")
_MISSING = object()


def _badam_optimizer(optimizer: Any) -> Any:
    """The plugin's optimizer under accelerate's (and DeepSpeed's) wrappers, or None."""
    return optiplug.unwrap_optimizer(optimizer, until=lambda o: hasattr(o, "switches") or hasattr(o, "sparse_dict"))


class BAdamTrainerCallback(BAdamCallback):
    """badam's ``BAdamCallback`` (ZeRO-3 wiring, input-grad handling for activation checkpointing), and:

    * under DeepSpeed ZeRO-3, makes the block switch due at a step once that step is complete;
    * logs each block activation (step and block) on the Trainer's logger (``transformers.trainer.badam``, INFO);
    * at the end of training, undoes what badam's callback and the optimizer changed on the
      model: the replaced ``gradient_checkpointing_enable``, the removed input-grad hook, the
      ``requires_grad`` flags and ratio mode's gradient hooks. A later ``train()`` applies them again.
    """

    def __init__(self) -> None:
        super().__init__()
        self._logged = 0
        self._had_input_grads = False
        self._own_gc_enable: Any = _MISSING

    def on_train_begin(self, args, state, control, **kwargs):
        model = kwargs["model"]
        self._had_input_grads = hasattr(model, "_require_grads_hook")
        self._own_gc_enable = model.__dict__.get("gradient_checkpointing_enable", _MISSING)
        super().on_train_begin(args, state, control, **kwargs)
        optimizer = _badam_optimizer(kwargs.get("optimizer"))
        if optimizer is not None:
            optimizer.attach()
            self._logged = max(len(getattr(optimizer, "switches", [])) - 1, 0)  # the block active now, and later ones
            self._log_switches(optimizer, state)

    def on_step_end(self, args, state, control, **kwargs):
        optimizer = _badam_optimizer(kwargs.get("optimizer"))
        if optimizer is not None:
            if hasattr(optimizer, "switch_if_due"):
                optimizer.switch_if_due()
            self._log_switches(optimizer, state)

    def on_train_end(self, args, state, control, **kwargs):
        model = kwargs["model"]
        if self._own_gc_enable is _MISSING:
            model.__dict__.pop("gradient_checkpointing_enable", None)
        else:
            model.gradient_checkpointing_enable = self._own_gc_enable
        if self._had_input_grads and not hasattr(model, "_require_grads_hook"):
            model.enable_input_require_grads()
        optimizer = _badam_optimizer(kwargs.get("optimizer"))
        if optimizer is not None:
            optimizer.release()

    def _log_switches(self, optimizer: Any, state: Any) -> None:
        switches = getattr(optimizer, "switches", [])
        if state.is_world_process_zero:
            for step, block in switches[self._logged :]:
                prefixes = optimizer.block_prefix_list[block]
                shown = ", ".join(prefixes[:3]) + (", ..." if len(prefixes) > 3 else "")
                logger.info(
                    "badam: block %d of %d active from step %d (%s)", block, optimizer.block_num, step + 1, shown
                )
        self._logged = len(switches)
