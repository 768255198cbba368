"""The default plugin's cross-cutting callbacks: PiSSA-to-LoRA conversion when the run config asks for it."""

from __future__ import annotations

from typing import Any

from optiplug.errors import ConfigError
from optiplug.hookspecs import hookimpl


@hookimpl
def trainer_callbacks(trainer: Any, config: Any) -> list[Any] | None:
    finetuning = getattr(config, "finetuning", None)
    if finetuning is None or finetuning.type != "lora" or not finetuning.pissa_convert:
        return None
    from optiplug.adapters import PissaConvertCallback
    from optiplug.context import BuildContext

    ctx = BuildContext(model=trainer.model, trainer=trainer, args=trainer.args)
    if ctx.distributed == "fsdp" or ctx.deepspeed_stage == 3:
        raise ConfigError(
            f"finetuning.pissa_convert needs whole weights on each process, which {ctx.distributed} "
            f"{'ZeRO-3 ' if ctx.deepspeed_stage == 3 else ''}shards: convert after training, or train without sharding"
        )
    return [PissaConvertCallback(trainer.model)]
