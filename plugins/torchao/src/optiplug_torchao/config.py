"""The configs of optiplug-torchao: torchao's low-bit AdamW, one class per state format."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

import optiplug


class LowBitAdamWFields(optiplug.AdamFields):
    """AdamW with quantized moments: the Adam fields, the block size and bf16 stochastic rounding."""

    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (not on biases and norms).")
    amsgrad: bool = False
    block_size: int = Field(256, ge=2, description="Elements per quantization block (one float32 scale each).")
    bf16_stochastic_round: bool = Field(
        False, description="Round bfloat16 parameters stochastically after the float32 update."
    )

    @model_validator(mode="after")
    def _even_blocks(self):
        if self.block_size % 2:
            raise ValueError(f"block_size must be even (got {self.block_size})")
        return self


class TorchaoAdamW8bitConfig(LowBitAdamWFields):
    """AdamW with 8-bit blockwise moments (torchao.optim.AdamW8bit, dynamic-tree quantization map)."""

    name: Literal["torchao_adamw8bit"] = "torchao_adamw8bit"


class TorchaoAdamW4bitConfig(LowBitAdamWFields):
    """AdamW with 4-bit blockwise moments (torchao.optim.AdamW4bit; the second moment's map has no zero)."""

    name: Literal["torchao_adamw4bit"] = "torchao_adamw4bit"
    block_size: int = Field(128, ge=2, description="Elements per quantization block (one float32 scale each).")


class TorchaoAdamWFp8Config(LowBitAdamWFields):
    """AdamW with float8 (e4m3) blockwise moments (torchao.optim.AdamWFp8); transformers has no name for it."""

    name: Literal["torchao_adamwfp8"] = "torchao_adamwfp8"
