"""The run header: what a run will do, said once after the optimizer is built and before the first step.

:func:`run_plan` collects the facts from the trainer (the model and what trains, the optimizer with
its non-default fields, the entry's ``describe`` line and its groups with their roles, the
schedule with its resolved lengths, steps, batch, accumulation, processes and engine, evaluation,
the output directory and the checkpoint plan); :func:`format_header` prints them as a few aligned
lines; ``summary.json`` keeps the same facts under ``"plan"``. :class:`HeaderCallback` does both at
``on_train_begin`` (``optiplug train --quiet`` keeps the facts and prints nothing).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import TrainerCallback

from optiplug.context import ParamShape

__all__ = ["HeaderCallback", "add_header", "format_header", "run_plan"]

_ENGINES = {"none": "single process", "ddp": "DDP", "fsdp": "FSDP"}


def _changed(config: Any) -> dict[str, Any]:
    """The config's fields that differ from their defaults (``name`` aside), as JSON values."""
    return config.model_dump(mode="json", exclude_defaults=True, exclude={"name"})


def _describe(describe: Any, *args: Any) -> str | None:
    if describe is None:
        return None
    try:
        return str(describe(*args))
    except Exception as error:  # a plugin's description must not stop the run; the header says it failed
        return f"(describe failed: {type(error).__name__}: {error})"


def _groups(optimizer: Any) -> list[dict[str, Any]]:
    """The optimizer's groups, merged by (label, role, lr): tensors, parameters and peak rate of each.

    The peak rate is the one the schedule scales (``initial_lr``, which torch's schedulers record); a
    warmup that starts at 0 has already set ``lr`` to 0 when the header is made.
    """
    from optiplug.params import DEFAULT_GROUP, GROUP_KEY, GROUP_ROLE

    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for group in getattr(optimizer, "param_groups", ()):
        rate = group.get("initial_lr", group.get("lr"))
        lr = float(rate) if isinstance(rate, (int, float)) else None
        key = (group.get(GROUP_KEY, DEFAULT_GROUP), group.get(GROUP_ROLE), lr)
        row = merged.setdefault(key, {"group": key[0], "role": key[1], "lr": lr, "tensors": 0, "parameters": 0})
        row["tensors"] += len(group["params"])
        row["parameters"] += sum(_numel(p) for p in group["params"])
    return list(merged.values())


def _numel(parameter: Any) -> int:
    """Elements of a parameter, also of a DeepSpeed ZeRO-3 placeholder (its full size is ``ds_numel``)."""
    return int(getattr(parameter, "ds_numel", None) or parameter.numel())


def _engine(trainer: Any) -> str:
    ctx = trainer.optiplug_context()
    engine = ctx.distributed
    if engine == "deepspeed":
        return f"DeepSpeed ZeRO-{ctx.deepspeed_stage}"
    return _ENGINES.get(engine, engine)


def _checkpoints(args: Any) -> str:
    strategy = getattr(args.save_strategy, "value", args.save_strategy)
    if strategy == "no":
        return "no checkpoints (training.save_strategy: no)"
    steps = f"{args.save_steps:g} steps" if args.save_steps >= 1 else f"{args.save_steps:g} of the run"
    every = {
        "steps": f"every {steps}",
        "epoch": "every epoch",
        "best": "at each new best evaluation",
    }.get(strategy, strategy)
    kept = f", the last {args.save_total_limit} kept" if args.save_total_limit else ", all kept"
    return f"a checkpoint {every} (checkpoint-N){kept}"


def _evaluation(trainer: Any, run_config: Any) -> dict[str, Any] | None:
    dataset = trainer.eval_dataset
    if dataset is None:
        return None
    args = trainer.args
    strategy = getattr(args.eval_strategy, "value", args.eval_strategy)
    data = getattr(run_config, "data", None)
    source = None
    if data is not None and data.eval_path is not None:
        source = f"data.eval_path={data.eval_path}"
    elif data is not None:
        source = f"data.eval_ratio={data.eval_ratio}"
    return {
        "blocks": len(dataset),
        "source": source,
        "strategy": strategy,
        "every": args.eval_steps if strategy == "steps" else None,
    }


def run_plan(
    trainer: Any, max_steps: int, optimizer: Any = None, shapes: Sequence[ParamShape] | None = None
) -> dict[str, Any]:
    """What the run will do, as plain values (``summary.json``'s ``"plan"``).

    Args:
        trainer: an :class:`~optiplug.OptiTrainer` whose optimizer and scheduler are built.
        max_steps: the run's optimizer steps (``state.max_steps``).
        optimizer: the built optimizer (default: the trainer's), unwrapped here.
        shapes: the trainable parameters as the run configured them, taken before the optimizer was
            built (BAdam's freezes all but its active block); default: the model's trainable ones now.
    """
    from optiplug.context import ScheduleContext
    from optiplug.registry import get_scheduler_entry
    from optiplug.unwrap import unwrap_optimizer

    args, model, run_config = trainer.args, trainer.model, trainer.optiplug_run_config
    raw = unwrap_optimizer(trainer.optimizer if optimizer is None else optimizer)
    parameters = list(model.parameters())
    shapes = ParamShape.of_model(model) if shapes is None else shapes
    cfg, entry = trainer.optimizer_config, trainer.optimizer_entry
    schedule = trainer.scheduler_config
    dataset = trainer.train_dataset
    block_size = getattr(dataset, "block_size", None)
    sequences = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    name = getattr(getattr(run_config, "model", None), "name_or_path", None) or getattr(model, "name_or_path", "")
    finetuning = getattr(getattr(run_config, "finetuning", None), "type", None)
    return {
        "model": {
            "name": name or None,
            "class": type(model).__name__,
            "dtype": str(next(iter(parameters)).dtype).removeprefix("torch.") if parameters else None,
            "parameters": sum(_numel(p) for p in parameters),
            "trainable_parameters": sum(shape.numel for shape in shapes),
        },
        "finetuning": finetuning or ("lora" if hasattr(model, "peft_config") else None),
        "optimizer": {
            "name": cfg.name,
            "changed": _changed(cfg),
            "describe": _describe(entry.describe, shapes, cfg),
            "groups": _groups(raw),
        },
        "scheduler": {
            "name": schedule.name,
            "changed": _changed(schedule),
            "describe": _describe(
                get_scheduler_entry(schedule.name).describe, ScheduleContext(raw, max_steps), schedule
            ),
        },
        "steps": max_steps,
        "start_step": int(trainer.state.global_step),
        "resumed_from": args.resume_from_checkpoint,
        "batch_per_device": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "processes": args.world_size,
        "engine": _engine(trainer),
        "device": str(args.device),
        "sequences_per_step": sequences,
        "tokens_per_step": sequences * block_size if block_size else None,
        "evaluation": _evaluation(trainer, run_config),
        "cooldown": cooldown.record() if (cooldown := getattr(trainer, "optiplug_cooldown", None)) else None,
        "output_dir": str(args.output_dir),
        "checkpoints": _checkpoints(args),
    }


# ---- the printed lines ----------------------------------------------------------------------


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    return str(value)


def _fields(changed: Mapping[str, Any]) -> str:
    parts = []
    for key, value in changed.items():
        if key == "param_groups":
            parts.append(f"param_groups: {len(value)} rule{'s' if len(value) != 1 else ''}")
        else:
            parts.append(f"{key}={_value(value)}")
    return ", ".join(parts) if parts else "defaults"


def _millions(count: int) -> str:
    if count < 100_000:
        return f"{count:,}"
    return f"{count / 1e6:.2f}M" if count < 1e10 else f"{count / 1e9:.1f}B"


def _group_line(row: Mapping[str, Any]) -> str:
    label = row["role"] or row["group"]
    if row["role"] and row["group"] != "default":
        label = f"{row['group']}: {row['role']}"
    tensors = f"{row['tensors']} tensor{'s' if row['tensors'] != 1 else ''}"
    lr = f", lr {row['lr']:g}" if row["lr"] is not None else ""
    return f"{label} ({tensors}, {_millions(row['parameters'])}{lr})"


def format_header(plan: Mapping[str, Any]) -> str:
    """The header's lines: ``optiplug run:`` then one aligned line per fact."""
    model, optimizer, scheduler = plan["model"], plan["optimizer"], plan["scheduler"]
    total, trainable = model["parameters"], model["trainable_parameters"]
    share = "all trainable" if trainable == total else f"{trainable:,} trainable ({100 * trainable / total:.2f}%)"
    finetuning = f"; {plan['finetuning']} fine-tuning" if plan["finetuning"] else ""
    what = (
        f"{model['name']} ({model['class']}, {model['dtype']})"
        if model["name"]
        else f"{model['class']} ({model['dtype']})"
    )
    lines = [
        ("model", f"{what}: {total:,} parameters, {share}{finetuning}"),
        ("optimizer", f"{optimizer['name']} ({_fields(optimizer['changed'])})"),
    ]
    if optimizer["describe"]:
        lines.append(("", optimizer["describe"]))
    groups = optimizer["groups"]
    labelled = any(row["group"] != "default" for row in groups)
    rates = {row["lr"] for row in groups}
    if labelled or len(rates) > 1 or (not optimizer["describe"] and any(row["role"] for row in groups)):
        lines.append(("", "groups: " + " · ".join(_group_line(row) for row in groups)))
    if optimizer["changed"].get("layerwise"):
        lines.append(("", "layerwise: each parameter steps in its gradient hook (one gradient held at a time)"))
    schedule = scheduler["describe"] or f"{_fields(scheduler['changed'])} over {plan['steps']} steps"
    if plan.get("cooldown"):  # the schedule of this run is the cooldown's
        from optiplug.app.cooldown import describe_branch

        schedule = describe_branch(plan["cooldown"])
    lines.append(("scheduler", f"{scheduler['name']}: {schedule}"))
    tokens = f", {plan['tokens_per_step']:,} tokens" if plan["tokens_per_step"] else ""
    resumed = f" from step {plan['start_step']} ({plan['resumed_from']})" if plan["resumed_from"] else ""
    processes = plan["processes"]
    batch = (
        f"{plan['batch_per_device']} sequences per device x {plan['gradient_accumulation_steps']} accumulation x "
        f"{processes} process{'es' if processes != 1 else ''} = {plan['sequences_per_step']} sequences{tokens}"
    )
    lines.append(("steps", f"{plan['steps']:,}{resumed}; {plan['engine']} on {plan['device']}"))
    lines.append(("batch", f"{batch} per step"))
    evaluation = plan["evaluation"]
    if evaluation:
        every = evaluation["every"]
        when = ("every step and " if every == 1 else f"every {every} steps and ") if every else ""
        if evaluation["strategy"] == "epoch":
            when = "every epoch and "
        source = f" ({evaluation['source']})" if evaluation["source"] else ""
        lines.append(("evaluation", f"{evaluation['blocks']} blocks{source}, {when}after the last step"))
    lines.append(("output", f"{plan['output_dir']}; {plan['checkpoints']}"))
    width = max(len(key) for key, _ in lines)
    return "optiplug run:\n" + "\n".join(f"  {key.ljust(width)}  {text}" for key, text in lines)


class HeaderCallback(TrainerCallback):
    """At ``on_train_begin`` (the optimizer and scheduler are built, no step taken): the plan, printed on stderr.

    The trainable parameters are read when the callback is made, before the optimizer is built. The
    plan is kept on the trainer (``trainer.optiplug_plan``) for ``summary.json``. Only the main
    process prints; ``quiet`` prints nothing.
    """

    def __init__(self, trainer: Any, quiet: bool = False):
        self.trainer, self.quiet = trainer, quiet
        self.shapes = ParamShape.of_model(trainer.model)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        plan = run_plan(self.trainer, int(state.max_steps), kwargs.get("optimizer"), self.shapes)
        self.trainer.optiplug_plan = plan
        if state.is_world_process_zero and not self.quiet:
            print(format_header(plan), file=sys.stderr, flush=True)


def add_header(trainer: Any, quiet: bool = False) -> None:
    """Give ``trainer`` the header (first among its callbacks: it prints before the progress bar starts).

    ``quiet`` also removes the Trainer's progress bar and log printer: the run prints nothing but errors.
    """
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.callback_handler.callbacks.insert(0, HeaderCallback(trainer, quiet))
    if quiet:
        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
