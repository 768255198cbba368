"""The config classes of the bridge's two schedules (``schedulers.py``), imported when a config is first read (not
by ``optiplug list``). The bridged optimizers' configs are generated from the catalogue (``catalogue.py``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

import optiplug


class RexConfig(optiplug.SchedulerConfig):
    """REX: rational decay from the peak to ``min_lr_ratio`` x the peak (pytorch-optimizer's REXScheduler)."""

    name: Literal["po_rex"] = "po_rex"
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final learning rate as a fraction of the peak.")


class WarmupStableDecayConfig(optiplug.SchedulerConfig):
    """Warmup, a stable phase, then a cooldown (pytorch-optimizer's get_wsd_schedule, its defaults)."""

    name: Literal["po_warmup_stable_decay"] = "po_warmup_stable_decay"
    warmup_steps: int = Field(0, ge=0, description="Linear warmup over this many optimizer steps.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Linear warmup over this fraction of the training steps.")
    decay_ratio: float = Field(0.2, gt=0, le=1, description="Fraction of the training steps spent cooling down.")
    cooldown_type: Literal["1-sqrt", "cosine", "linear", "1-square"] = Field(
        "1-sqrt", description="Shape of the cooldown."
    )
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Learning rate after the cooldown, as a fraction.")
    num_cycles: float = Field(0.5, gt=0, description="Cosine cycles of the cooldown (cooldown_type cosine only).")

    @model_validator(mode="after")
    def _one_warmup(self) -> WarmupStableDecayConfig:
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("set warmup_steps or warmup_ratio, not both")
        return self
