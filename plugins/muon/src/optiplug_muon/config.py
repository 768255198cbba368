"""The ``muon`` optimizer config (pydantic only: importing this module does not import torch)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

import optiplug

AdjustLR = Literal["original", "match_rms_adamw", "spectral"]

# Keller Jordan's quintic Newton-Schulz coefficients, torch.optim.Muon's defaults.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)

DEFAULT_ADAMW_PATTERNS = (
    "embed",  # embed_tokens (Llama, Qwen, OPT), embed_positions, embed_in/embed_out (GPT-NeoX), word_embeddings
    r"(^|\.)wte\.",  # GPT-2 token embedding
    r"(^|\.)wpe\.",  # GPT-2 position embedding
    r"(^|\.)lm_head\.",  # the output head of every *ForCausalLM
    r"(^|\.)score\.",  # *ForSequenceClassification head
    r"(^|\.)classifier\.",  # BERT-style classification head
)
"""Parameter-name regexes (``re.search``) kept on AdamW whatever their shape: embeddings and output heads."""


class MuonConfig(optiplug.OptimizerConfig):
    """Muon (torch.optim.Muon) on the 2-D hidden weight matrices, AdamW on everything else.

    A trainable parameter goes to AdamW when it is not 2-D (norms, biases, convolutions), belongs to an
    ``nn.Embedding``, is the model's output head, or its name matches one of ``adamw_patterns``; every
    other parameter (the attention and MLP projection matrices) goes to Muon.
    """

    name: Literal["muon"] = "muon"
    lr: optiplug.LearningRate = Field(
        0.02, description="Muon's learning rate (before adjust_lr's per-matrix scale); the peak of the schedule."
    )
    momentum: float = Field(0.95, ge=0.0, lt=1.0, description="Muon's momentum.")
    nesterov: bool = Field(True, description="Nesterov momentum (the update orthogonalized is g + momentum * buffer).")
    adjust_lr: AdjustLR = Field(
        "original",
        description="Per-matrix scale of Muon's learning rate, for a fan_out x fan_in weight: 'original' "
        "sqrt(max(1, fan_out/fan_in)) (Keller Jordan), 'match_rms_adamw' 0.2 * sqrt(max(fan_out, fan_in)) "
        "(Moonshot: reuse AdamW's lr and weight decay), 'spectral' sqrt(fan_out/fan_in) (Dion, Axolotl).",
    )
    ns_steps: int = Field(5, ge=1, lt=100, description="Newton-Schulz iterations per update.")
    ns_coefficients: tuple[float, float, float] = Field(
        NS_COEFFICIENTS, description="Coefficients (a, b, c) of the quintic Newton-Schulz iteration."
    )
    ns_eps: float = Field(1e-7, gt=0, description="Floor of the norm the update is divided by before Newton-Schulz.")
    ns_dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16",
        description="Precision of Newton-Schulz: bfloat16 (torch.optim.Muon's, fast on GPUs) or float32 (steps that "
        "agree to float rounding across one process, DDP and FSDP2; several times slower on GPUs).",
    )
    weight_decay: float = Field(
        0.0,
        ge=0,
        description="Decoupled weight decay of the Muon matrices (p -= lr * wd * p) and of AdamW's decay group "
        "(embeddings, head); never on norms and biases.",
    )
    adamw_lr: optiplug.LearningRate = Field(
        3e-2,
        description="AdamW's learning rate (the peak of the schedule) for embeddings, head, norms and biases; high, "
        "as in Muon recipes. On the embedded job 3e-2 and 1e-1 train alike, 3e-3 far worse (benchmarks/muon_training)",
    )
    adamw_betas: optiplug.Betas = (0.9, 0.95)
    adamw_eps: float = Field(1e-8, gt=0, description="AdamW's term added to the denominator.")
    adamw_patterns: tuple[str, ...] = Field(
        DEFAULT_ADAMW_PATTERNS,
        description="Regexes searched in each parameter's qualified name: a match keeps the parameter on AdamW "
        "(embeddings and output heads by default; non-2-D parameters and nn.Embedding weights always are).",
    )
    kernel: optiplug.Kernel = Field(
        "auto", description="AdamW's kernel: 'auto' (fused where supported), 'fused', 'foreach', 'for-loop'."
    )

    @field_validator("adamw_patterns")
    @classmethod
    def _valid_patterns(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            if not pattern:
                raise ValueError("adamw_patterns must not contain an empty pattern (it matches every parameter)")
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"{pattern!r} is not a valid regex: {error}") from None
        return value
