"""What DeepSpeed's own Muon can and cannot do for ``muon``: refusals with one sentence each (no torch here).

DeepSpeed 0.19.8's Muon (what ``muon`` builds under ``training.deepspeed``, see :mod:`optiplug_muon.zero`)
has fixed choices where optiplug's has fields, clips after Newton–Schulz, needs ZeRO-3 without
reduce-scatter, and reads every weight as ``(fan_out, fan_in)``. Each mismatch is refused here,
before any step, rather than trained as something else.
"""

from __future__ import annotations

from typing import Any

import optiplug
from optiplug_muon.config import NS_COEFFICIENTS, MuonConfig
from optiplug_muon.routing import TRANSPOSED_MODULES, Routing

__all__ = ["check_deepspeed", "deepspeed_config"]

# optiplug's field, its value DeepSpeed's Muon runs, and what DeepSpeed does.
_FIXED = (
    ("adjust_lr", "original", "its learning rate scale is sqrt(max(1, fan_out/fan_in))"),
    ("nesterov", True, "its momentum is Nesterov's"),
    ("ns_steps", 5, "it runs 5 Newton–Schulz steps"),
    ("ns_coefficients", NS_COEFFICIENTS, f"its coefficients are {NS_COEFFICIENTS}"),
    ("ns_eps", 1e-7, "it divides by the norm plus 1e-7"),
    ("ns_dtype", "bfloat16", "its Newton–Schulz runs in bfloat16"),
)


def deepspeed_config(ctx: optiplug.BuildContext) -> dict[str, Any]:
    """The run's DeepSpeed config as transformers filled it in (``"auto"`` values resolved where it could)."""
    plugin = getattr(ctx.args, "hf_deepspeed_config", None)
    config = getattr(plugin, "config", None)
    if isinstance(config, dict):
        return config
    given = getattr(ctx.args, "deepspeed", None)
    return given if isinstance(given, dict) else {}


def _clipping(ctx: optiplug.BuildContext, config: dict[str, Any]) -> float:
    value = config.get("gradient_clipping", "auto")
    if value == "auto" or value is None:
        return float(ctx.max_grad_norm or 0.0)
    return float(value)


def check_deepspeed(ctx: optiplug.BuildContext, cfg: MuonConfig, route: Routing) -> None:
    """Refuse what DeepSpeed's Muon would train differently from ``muon``'s config, with one sentence.

    Raises:
        optiplug.ConfigError: a field DeepSpeed's Muon fixes, set otherwise; gradient clipping under ZeRO
            (DeepSpeed clips the orthogonalized update); ZeRO-3 with reduce-scatter; a transposed
            (``Conv1D``) non-square matrix routed to Muon.
    """
    stage = ctx.deepspeed_stage or 0
    engine = f"DeepSpeed ZeRO-{stage}"
    fixed = [
        f"{name} {getattr(cfg, name)!r} ({does})"
        for name, value, does in _FIXED
        if name in type(cfg).model_fields and getattr(cfg, name) != value
    ]
    if fixed:
        raise optiplug.ConfigError(
            f"muon under {engine} runs DeepSpeed's own Muon, which cannot honour {'; '.join(fixed)}: leave "
            f"{'these fields' if len(fixed) > 1 else 'this field'} at the default, or train without DeepSpeed"
        )
    config = deepspeed_config(ctx)
    clip = _clipping(ctx, config)
    if stage >= 1 and clip > 0:
        raise optiplug.ConfigError(
            f"muon under {engine}: DeepSpeed clips after Newton–Schulz, on the norm of Muon's orthogonalized update "
            f"(about sqrt(rows) per matrix), not of the gradient, so clipping at {clip:g} would shrink every Muon "
            "step many times over: set max_grad_norm to 0 (and gradient_clipping in the DeepSpeed config, if it "
            "is a number)"
        )
    if stage == 3 and config.get("zero_optimization", {}).get("reduce_scatter", True) is not False:
        raise optiplug.ConfigError(
            "muon under DeepSpeed ZeRO-3: DeepSpeed runs Muon at stage 3 only without reduce-scatter (it raises "
            '"Muon and reduce scatter cannot be used together"): set "reduce_scatter": false in the DeepSpeed '
            "config's zero_optimization"
        )
    flipped = [s.name for s in route.muon if s.module_type in TRANSPOSED_MODULES and s.shape[0] != s.shape[1]]
    if flipped:
        raise optiplug.ConfigError(
            f"muon under {engine}: {len(flipped)} Muon matrices ({flipped[0]}, ...) are transformers Conv1D weights, "
            "stored as (fan_in, fan_out), and DeepSpeed's Muon scales each step by sqrt(rows/cols) as if it were "
            "(fan_out, fan_in), the wrong factor for these: train this model with muon without DeepSpeed, or keep "
            "them on AdamW with optimizer.adamw_patterns"
        )
