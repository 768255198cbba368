"""A cooldown branched from a checkpoint: the one change a resumed run may make (torch only inside functions).

``optiplug train RUN.yaml training.resume_from_checkpoint=OUT/checkpoint-S cooldown.steps=C`` continues
the run of that checkpoint exactly (weights, optimizer state, data order, RNG) for ``C`` more steps,
while the learning rate decays from the checkpoint's rate to the schedule's floor with the schedule's
decay shape: the steps of one warmup-stable-decay run whose decay starts at ``S`` and lasts ``C``.
Schedules whose entry declares ``cooldown`` may be branched (``warmup_stable_decay``: its own decay;
``constant`` and ``constant_with_warmup``: the cooldown's own ``decay_type`` and ``min_lr_ratio``).

Where it writes (:func:`resolve_cooldown`): from a checkpoint of the run in ``training.output_dir``,
into ``<output_dir>-cooldown-<S>-<C>`` beside it, so the run and every cooldown branched from it keep
their own directories; from a checkpoint anywhere else (another run's directory), into
``training.output_dir`` itself, under the usual output-directory rule. The branch (checkpoint, step,
rate, shape, floor) is recorded in every checkpoint the cooldown writes and in ``summary.json``; a
cooldown's checkpoint resumes only as the same cooldown.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from optiplug.errors import CheckpointError, ConfigError

__all__ = ["Branch", "cooldown_factor", "describe_branch", "resolve_cooldown"]

_RECORD = "optiplug_config.json"  # optiplug.app.safety.CHECKPOINT_RECORD (safety imports the app's config)
_DEFAULTS = {"decay_type": "cosine", "min_lr_ratio": 0.0, "num_cycles": 0.5}


def cooldown_factor(
    step: int, *, start: int, steps: int, rate: float, decay_type: str, min_lr_ratio: float, num_cycles: float
) -> float:
    """The learning-rate multiplier at optimizer ``step`` of a cooldown from ``start`` at multiplier ``rate``.

    Over ``steps`` steps the multiplier goes from ``rate`` to ``min_lr_ratio`` with transformers'
    warmup-stable-decay decay formulas (the same arithmetic, so a cooldown from a stable rate of 1 takes
    the steps of ``get_wsd_schedule`` bit for bit); before ``start`` it is ``rate``, after the decay the floor.
    """
    if step < start:
        return rate
    if step >= start + steps:
        return min_lr_ratio
    progress = float(step - start) / float(max(1, steps))
    if decay_type == "linear":
        factor = 1.0 - progress
    elif decay_type == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
    else:  # 1-sqrt
        factor = 1.0 - math.sqrt(progress)
    factor = factor * (rate - min_lr_ratio) + min_lr_ratio
    return max(0.0, factor)


@dataclass(frozen=True)
class Branch:
    """Where a cooldown branches and how it decays (recorded in its checkpoints and ``summary.json``).

    Attributes:
        checkpoint: the checkpoint the cooldown branched from.
        from_step: its global step: the cooldown trains steps ``from_step + 1`` to ``until_step``.
        steps: the cooldown's length.
        rate: the checkpoint's learning-rate multiplier (the rate / the schedule's peak), where the decay starts.
        decay_type, min_lr_ratio, num_cycles: the decay's shape and floor.
    """

    checkpoint: str
    from_step: int
    steps: int
    rate: float
    decay_type: str
    min_lr_ratio: float
    num_cycles: float

    @property
    def until_step(self) -> int:
        return self.from_step + self.steps

    def record(self) -> dict[str, Any]:
        return {**asdict(self), "until_step": self.until_step}

    def factor(self, step: int) -> float:
        return cooldown_factor(
            step, start=self.from_step, steps=self.steps, rate=self.rate, decay_type=self.decay_type,
            min_lr_ratio=self.min_lr_ratio, num_cycles=self.num_cycles,
        )  # fmt: skip

    def scheduler(self, optimizer: Any) -> Any:
        """A ``LambdaLR`` on the raw optimizer: every group's rate times :meth:`factor` (groups stay in proportion)."""
        import torch

        return torch.optim.lr_scheduler.LambdaLR(optimizer, self.factor)


def describe_branch(record: dict[str, Any]) -> str:
    """``cooldown of 200 steps from step 800 (cosine decay from 1 x lr to 0 x lr), branched from OUT/checkpoint-800``
    (the scheduler line of the run header)."""
    return (
        f"cooldown of {record['steps']} steps from step {record['from_step']} ({record['decay_type']} decay from "
        f"{record['rate']:g} x lr to {record['min_lr_ratio']:g} x lr), branched from {record['checkpoint']}"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _checkpoint_rate(checkpoint: Path) -> float:
    """The learning-rate multiplier the checkpoint's schedule had reached (``scheduler.pt``: last rate / base)."""
    import torch

    field = "training.resume_from_checkpoint"
    path = checkpoint / "scheduler.pt"
    if not path.is_file():
        raise CheckpointError(
            f"{field}: {str(checkpoint)!r} has no scheduler.pt, so the rate a cooldown starts from is unknown; "
            "branch from a complete checkpoint"
        )
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
        last, base = state["_last_lr"][0], state["base_lrs"][0]
        return float(last) / float(base)
    except Exception as error:  # a corrupt or foreign scheduler state: refuse with its cause
        raise CheckpointError(
            f"{field}: {str(path)!r} cannot be read as a learning-rate schedule ({type(error).__name__}); "
            "branch from another checkpoint"
        ) from None


def _inside(child: Path, parent: Path) -> bool:
    child, parent = child.expanduser().resolve(), parent.expanduser().resolve()
    return child == parent or parent in child.parents


def _shape(config: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    given = {key: getattr(config, key) for key in _DEFAULTS if getattr(config, key) is not None}
    return {**_DEFAULTS, **defaults, **given}


def resolve_cooldown(config: Any, default_output_dir: str) -> tuple[Any, Branch | None]:
    """The run config a cooldown trains with (``max_steps`` and ``output_dir`` set), and its :class:`Branch`.

    Without ``cooldown`` the config comes back as it is; a checkpoint written by a cooldown is then
    refused (it resumes only as that cooldown). A checkpoint that is not a complete Trainer checkpoint
    is left to the resume checks, which say so.

    Raises:
        ConfigError: no checkpoint, a schedule that cannot be branched, a checkpoint already in another
            cooldown, or a rate already at the floor.
    """
    from optiplug.errors import OptiplugError
    from optiplug.registry import get_scheduler_entry, parse_scheduler

    cooldown, training = config.cooldown, config.training
    resume = training.get("resume_from_checkpoint")
    if cooldown is None and not resume:
        return config, None
    if cooldown is not None and not resume:
        raise ConfigError(
            "cooldown.steps: a cooldown branches from a checkpoint: set "
            "training.resume_from_checkpoint=OUT/checkpoint-N"
        )
    checkpoint = Path(str(resume))
    state = _read_json(checkpoint / "trainer_state.json")
    if not state:
        return config, None  # the resume checks refuse it with their sentence
    saved = _read_json(checkpoint / _RECORD)
    record = saved.get("cooldown")
    field = "training.resume_from_checkpoint"
    if cooldown is None:
        if record:
            raise ConfigError(
                f"{field}: {str(checkpoint)!r} was written by a cooldown of {record.get('steps')} steps from step "
                f"{record.get('from_step')}: resume it with cooldown.steps={record.get('steps')}"
            )
        return config, None
    if record:  # an interrupted cooldown: resume it, as it was
        branch = Branch(**{key: record[key] for key in Branch.__dataclass_fields__})
        wanted = _shape(cooldown, {key: record[key] for key in _DEFAULTS})
        if cooldown.steps != branch.steps or any(wanted[key] != getattr(branch, key) for key in _DEFAULTS):
            raise ConfigError(
                f"cooldown: {str(checkpoint)!r} is in a cooldown of {branch.steps} steps from step {branch.from_step} "
                f"({branch.decay_type} to {branch.min_lr_ratio:g} x lr); resume it with the same cooldown, or branch "
                f"a new one from {branch.checkpoint}"
            )
    else:
        # the checkpoint's schedule (a run config that names another is refused by the resume checks)
        try:
            schedule = parse_scheduler(saved["scheduler"])
        except (KeyError, TypeError, OptiplugError):  # no record (a plain Trainer's checkpoint), or a foreign one
            schedule = config.scheduler
        entry = get_scheduler_entry(schedule.name)
        if entry.cooldown is None:
            raise ConfigError(
                f"cooldown: {str(checkpoint)!r} was trained with scheduler {schedule.name!r}, whose rate follows the "
                "whole run: it has no stable rate to branch a cooldown from; train with "
                "scheduler.name=warmup_stable_decay (or constant) to branch cooldowns from its checkpoints"
            )
        shape = _shape(cooldown, dict(entry.cooldown(schedule)))
        branch = Branch(str(checkpoint), int(state.get("global_step", 0)), cooldown.steps,
                        _checkpoint_rate(checkpoint), **shape)  # fmt: skip
        if branch.rate <= branch.min_lr_ratio:
            raise ConfigError(
                f"cooldown: the rate at {str(checkpoint)!r} is {branch.rate:g} x lr, already at or below the floor "
                f"{branch.min_lr_ratio:g} x lr: branch from a checkpoint of the stable phase, or lower "
                "cooldown.min_lr_ratio"
            )
    output = Path(str(training.get("output_dir", default_output_dir)))
    beside = output.with_name(f"{output.name}-cooldown-{branch.from_step}-{branch.steps}")
    if _inside(checkpoint, output) or _inside(checkpoint, beside):
        output = beside
    training = {**training, "max_steps": branch.until_step, "output_dir": str(output)}
    return config.model_copy(update={"training": training}), branch
