"""Lion as a third-party optiplug plugin: exactly what docs/writing-a-plugin.md shows."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

import optiplug


class LionConfig(optiplug.OptimizerConfig):
    """Lion: sign-momentum optimizer (Chen et al. 2023)."""

    name: Literal["lion"] = "lion"
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = Field(0.0, ge=0)


def build_lion(ctx: optiplug.BuildContext, cfg: LionConfig):
    from optiplug_testlion.optim import Lion  # heavy imports inside the factory

    return Lion(ctx.param_groups(weight_decay=cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)


def lion_state_bytes(shapes, cfg: LionConfig) -> int:
    return sum(s.numel * s.itemsize for s in shapes)  # one momentum buffer per parameter


@optiplug.hookimpl
def register_optimizers(register):
    register(
        optiplug.OptimizerEntry(
            config=LionConfig, build=build_lion, summary="Lion (sign momentum)", state_bytes=lion_state_bytes
        )
    )
