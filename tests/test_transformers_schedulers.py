"""Every lr_scheduler_type of the installed transformers, name by name against transformers' own Trainer.

OptiTrainer with ``lr_scheduler_type=NAME`` and ``lr_scheduler_kwargs`` (no ``scheduler=``) must set the same
learning rate as ``transformers.Trainer`` at every step of a run on the same optimizer; a name a future
transformers adds fails ``test_every_scheduler_name_is_mapped`` until it is mapped.
"""

from __future__ import annotations

import pytest

import optiplug
from optiplug.testing import TokenBlocks, tiny_llama, training_args

transformers = pytest.importorskip("transformers")

STEPS = 24
# kwargs transformers' Trainer accepts for each name, away from the defaults where there are any
KWARGS = {
    "cosine": {"num_cycles": 0.4},
    "cosine_with_restarts": {"num_cycles": 2},
    "polynomial": {"lr_end": 1e-5, "power": 2.0},
    "inverse_sqrt": {"timescale": 5},
    "reduce_lr_on_plateau": {"factor": 0.5, "patience": 1},
    "cosine_with_min_lr": {"min_lr_rate": 0.2},
    "cosine_warmup_with_min_lr": {"min_lr": 1e-4, "warmup_lr_rate": 0.3},
    "warmup_stable_decay": {"num_decay_steps": 6, "decay_type": "linear", "min_lr_ratio": 0.1},
    "greedy": {"factor": 0.5, "patience": 1, "min_lr": 1e-4, "max_lr": 0.5},
}
# names transformers' Trainer cannot build without some kwargs (its message)
REQUIRED = {
    "cosine_with_min_lr": "One of min_lr or min_lr_rate should be set",
    "cosine_warmup_with_min_lr": "One of min_lr or min_lr_rate should be set",
    "warmup_stable_decay": "num_decay_steps",
}
# a metric that improves, then stalls: plateau and greedy schedules move both ways
METRICS = [1.0 - 0.1 * min(step, 6) for step in range(STEPS)]


def _rates(trainer_class, name: str, tmp_path, kwargs: dict) -> list[list[float]]:
    args = training_args(
        tmp_path / trainer_class.__name__,
        lr_scheduler_type=name,
        lr_scheduler_kwargs=kwargs,
        warmup_steps=4,
        learning_rate=0.05,
        weight_decay=0.01,
        eval_strategy="steps",  # plateau schedules need evaluation (no evaluation runs here)
        eval_steps=STEPS,
    )
    blocks = TokenBlocks(n=4)
    trainer = trainer_class(model=tiny_llama(layers=1, hidden=8), args=args, train_dataset=blocks, eval_dataset=blocks)
    trainer.create_optimizer_and_scheduler(num_training_steps=STEPS)
    scheduler, optimizer = trainer.lr_scheduler, trainer.optimizer
    by_metric = isinstance(scheduler, (transformers.optimization.GreedyLR, optiplug_plateau()))
    rates = []
    for step in range(STEPS):
        rates.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step(METRICS[step]) if by_metric else scheduler.step()
    return rates


def optiplug_plateau() -> type:
    import torch

    return torch.optim.lr_scheduler.ReduceLROnPlateau


def test_every_scheduler_name_is_mapped():
    from transformers.trainer_utils import SchedulerType

    names = {kind.value for kind in SchedulerType}
    assert names - set(KWARGS) - {"linear", "constant", "constant_with_warmup"} == set(), "a new SchedulerType name"
    from optiplug.registry import resolve

    for name in names:
        assert resolve("scheduler", name, transformers=True).row.plugin.startswith("optiplug"), (
            name
        )  # the default plugin


@pytest.mark.parametrize("kwargs", [True, False], ids=["kwargs", "defaults"])
@pytest.mark.parametrize("name", [kind.value for kind in transformers.trainer_utils.SchedulerType])
def test_a_scheduler_name_sets_transformers_rates(name, kwargs, tmp_path):
    given = KWARGS.get(name, {}) if kwargs else {}
    if not kwargs and name in REQUIRED:  # transformers refuses to build it; optiplug takes its defaults (docs)
        with pytest.raises((ValueError, TypeError), match=REQUIRED[name]):
            _rates(transformers.Trainer, name, tmp_path, given)
        assert len({tuple(r) for r in _rates(optiplug.OptiTrainer, name, tmp_path, given)}) > 1
        return
    reference = _rates(transformers.Trainer, name, tmp_path, given)
    assert _rates(optiplug.OptiTrainer, name, tmp_path, given) == reference
    assert len({tuple(r) for r in reference}) > 1 or name == "constant"  # the schedule moved the rate
