"""The parameter groups a run would train with, printed before anything trains (``optiplug validate --groups``).

The optimizer is really built (on the configured model, after ``finetuning``), so what is printed
is what the optimizer holds: ``optimizer.param_groups`` entries, the plugin's own split (GaLore's
projected parameters, LoRA+'s B matrices), the no-decay rule, each group's rate and weight decay.
"""

from __future__ import annotations

from typing import Any

from optiplug.app.config import RunConfig

__all__ = ["group_rows", "groups_table", "run_model"]


def run_model(config: RunConfig) -> Any:
    """The model ``config`` trains, loaded (with its seed) and with the fine-tuning applied."""
    from optiplug.app.adapters import apply_finetuning
    from optiplug.app.run import _load_model, default_training_arguments
    from optiplug.app.validation import training_arguments

    args = training_arguments(config, default_training_arguments())
    return apply_finetuning(_load_model(config.model, args.seed), config.finetuning)


def group_rows(config: RunConfig, model: Any = None) -> list[dict[str, Any]]:
    """One row per parameter group of the optimizer ``config`` builds on its model (or on ``model``).

    Each row: ``group`` (the ``optimizer.param_groups`` label, ``default`` for the rest), ``pattern``
    (the entry's ``match``, or None), ``tensors``, ``parameters`` (elements), ``lr``, ``weight_decay``,
    ``role`` (what the plugin does with the group, its :data:`~optiplug.params.GROUP_ROLE`, or None).

    Raises:
        ConfigError: as ``optiplug train`` would, before any step (unmatched patterns, unknown options).
    """
    from optiplug.app.run import default_training_arguments
    from optiplug.app.validation import training_arguments
    from optiplug.context import BuildContext
    from optiplug.factory import build_from_entry
    from optiplug.params import DEFAULT_GROUP, GROUP_KEY, GROUP_ROLE
    from optiplug.registry import get_entry
    from optiplug.unwrap import unwrap_optimizer

    args = training_arguments(config, default_training_arguments())
    if model is None:
        model = run_model(config)
    cfg = config.optimizer
    optimizer = unwrap_optimizer(build_from_entry(get_entry(cfg.name), BuildContext(model=model, args=args), cfg))
    patterns = {rule.label: rule.match for rule in cfg.param_groups}
    rows = []
    for group in optimizer.param_groups:
        label = group.get(GROUP_KEY, DEFAULT_GROUP)
        rows.append(
            {
                "group": label,
                "pattern": patterns.get(label),
                "tensors": len(group["params"]),
                "parameters": sum(p.numel() for p in group["params"]),
                "lr": float(group["lr"]) if "lr" in group else None,
                "weight_decay": float(group["weight_decay"]) if "weight_decay" in group else None,
                "role": group.get(GROUP_ROLE),
            }
        )
    return rows


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def groups_table(config: RunConfig, rows: list[dict[str, Any]], describe: str | None = None) -> str:
    """The rows as an aligned table under a title line, with the no-decay rule below.

    A ``role`` column (what the plugin does with each group) is shown when the optimizer labels its groups.
    """
    from optiplug.params import NO_DECAY_RULE

    roles = any(row.get("role") for row in rows)
    header = ("group", "pattern", "tensors", "parameters", "lr", "weight_decay") + (("role",) if roles else ())
    cells = [header] + [
        (
            row["group"],
            row["pattern"] or "(unmatched)",
            str(row["tensors"]),
            f"{row['parameters']:,}",
            _number(row["lr"]),
            _number(row["weight_decay"]),
        )
        + ((str(row.get("role") or "-"),) if roles else ())
        for row in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    lines = [f"parameter groups of optimizer {config.optimizer.name!r} on {config.model.name_or_path}:"]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    if describe:
        lines.append(describe)
    lines.append(f"weight decay: {NO_DECAY_RULE}.")
    return "\n".join(lines)
