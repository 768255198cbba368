"""A cooldown branched from a checkpoint: the one supported change on resume (cooldown.steps)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import optiplug
import optiplug.app
from optiplug import OptiplugError
from optiplug.app.config import load_config
from optiplug.app.cooldown import cooldown_factor
from optiplug.app.run import validate_run

S, WARMUP, C = 6, 2, 4
BASE = [
    "data.block_size=16", "data.max_blocks=64", "training.per_device_train_batch_size=4",
    "training.logging_steps=1", "training.disable_tqdm=true",
]  # fmt: skip
# The branched run: stable from step WARMUP on (its planned decay lies after the S steps it trains).
WSD = [
    "scheduler.name=warmup_stable_decay", f"scheduler.warmup_steps={WARMUP}", "scheduler.stable_steps=100",
    f"scheduler.decay_steps={C}", "scheduler.min_lr_ratio=0.1", "scheduler.decay_type=1-sqrt",
]  # fmt: skip
# The reference: one WSD run of S + C steps whose decay starts at S.
REFERENCE = [
    "scheduler.name=warmup_stable_decay", f"scheduler.warmup_steps={WARMUP}", f"scheduler.stable_steps={S - WARMUP}",
    f"scheduler.decay_steps={C}", "scheduler.min_lr_ratio=0.1", "scheduler.decay_type=1-sqrt",
]  # fmt: skip


def _history(out):
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


def _steps(out):
    """Every logged training step: (loss, learning rate, gradient norm)."""
    return {e["step"]: (e["loss"], e["learning_rate"], e["grad_norm"]) for e in _history(out) if "loss" in e}


@pytest.mark.parametrize("decay_type", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize("min_lr_ratio", [0.0, 0.1, 0.37])
def test_a_cooldown_from_a_stable_rate_is_transformers_wsd_decay_to_the_bit(decay_type, min_lr_ratio):
    from transformers.optimization import _get_wsd_scheduler_lambda

    for step in range(0, 40):
        wsd = _get_wsd_scheduler_lambda(
            step, num_warmup_steps=3, num_stable_steps=9, num_decay_steps=17, warmup_type="linear",
            decay_type=decay_type, min_lr_ratio=min_lr_ratio, num_cycles=0.5,
        )  # fmt: skip
        ours = cooldown_factor(step, start=12, steps=17, rate=1.0, decay_type=decay_type,
                               min_lr_ratio=min_lr_ratio, num_cycles=0.5)  # fmt: skip
        if step >= 12:
            assert ours == wsd, step  # exactly: the same arithmetic
    halfway = cooldown_factor(20, start=10, steps=20, rate=0.5, decay_type="linear", min_lr_ratio=0.1, num_cycles=0.5)
    assert halfway == pytest.approx(0.3)  # from the checkpoint's rate (0.5 x lr) to the floor


@pytest.fixture(scope="module")
def branched(tmp_path_factory):
    """A WSD run of S steps with a checkpoint at S; the reference run of S + C steps; the cooldown from the checkpoint."""
    root = tmp_path_factory.mktemp("cooldown")
    optiplug.app.train(overrides=[*BASE, *WSD, f"training.max_steps={S}", f"training.save_steps={S}",
                              f"training.output_dir={root / 'run'}"], quiet=True)  # fmt: skip
    reference = optiplug.app.train(overrides=[*BASE, *REFERENCE, f"training.max_steps={S + C}",
                                          f"training.output_dir={root / 'reference'}"], quiet=True)  # fmt: skip
    # the run's own config, as a user reruns it: only the checkpoint, the cooldown and a checkpoint at its end added
    cooldown = optiplug.app.train(
        overrides=[*BASE, *WSD, f"training.max_steps={S}", f"training.save_steps={S}",
                   f"training.output_dir={root / 'run'}", f"training.resume_from_checkpoint={root / 'run'}/checkpoint-{S}",
                   f"cooldown.steps={C}"],
        quiet=True,
    )  # fmt: skip
    return root, reference, cooldown


def test_the_cooldown_takes_the_steps_of_one_wsd_run_whose_decay_starts_at_the_checkpoint(branched):
    root, reference, cooldown = branched
    assert cooldown.output_dir == root / f"run-cooldown-{S}-{C}"  # beside the run, whose files stay as they were
    ours, theirs = _steps(cooldown.output_dir), _steps(reference.output_dir)
    assert sorted(ours) == list(range(1, S + C + 1))  # the branched run's steps, then the cooldown's
    assert {step: theirs[step] for step in ours} == ours  # losses, rates and gradient norms, to the bit
    rates = [ours[step][1] for step in sorted(ours) if step > S]
    assert rates[0] == 1e-3 and rates == sorted(rates, reverse=True) and rates[-1] > 1e-4
    final, expected = (
        load_file(cooldown.output_dir / "model.safetensors"),
        load_file(reference.output_dir / "model.safetensors"),
    )
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)
    assert sorted(p.name for p in (root / "run").glob("checkpoint-*")) == [f"checkpoint-{S}"]
    assert json.loads((root / "run" / "summary.json").read_text())["steps"] == S


def test_the_branch_is_recorded_in_the_summary_the_checkpoints_and_the_header(branched):
    root, _, cooldown = branched
    branch = {"checkpoint": str(root / "run" / f"checkpoint-{S}"), "from_step": S, "steps": C, "rate": 1.0,
              "decay_type": "1-sqrt", "min_lr_ratio": 0.1, "num_cycles": 0.5, "until_step": S + C}  # fmt: skip
    assert cooldown.summary["cooldown"] == branch and cooldown.summary["steps"] == S + C
    assert cooldown.summary["scheduler"]["name"] == "warmup_stable_decay"  # the run's schedule, unchanged
    record = json.loads((cooldown.output_dir / f"checkpoint-{S + C}" / "optiplug_config.json").read_text())
    assert record["cooldown"] == branch
    assert cooldown.summary["plan"]["cooldown"] == branch and cooldown.summary["plan"]["start_step"] == S


def test_several_cooldowns_from_one_checkpoint_go_to_separate_directories(branched):
    root, _, first = branched
    second = optiplug.app.train(
        overrides=[*BASE, *WSD, f"training.output_dir={root / 'run'}", "cooldown.steps=2", "cooldown.decay_type=linear",
                   f"training.resume_from_checkpoint={root / 'run'}/checkpoint-{S}"],
        quiet=True,
    )  # fmt: skip
    assert second.output_dir == root / f"run-cooldown-{S}-2" != first.output_dir
    rates = [rate for step, (_, rate, _) in sorted(_steps(second.output_dir).items()) if step > S]
    assert rates == [1e-3, pytest.approx(1e-3 * (0.5 * 0.9 + 0.1))]  # linear, halfway to the floor at the 2nd step
    assert _steps(first.output_dir) == _steps(root / f"run-cooldown-{S}-{C}")  # the first one untouched
    # from a checkpoint in another run's directory: into training.output_dir itself
    elsewhere = validate_run(load_config(None, [
        *BASE, *WSD, f"training.output_dir={root / 'mine'}", "cooldown.steps=3",
        f"training.resume_from_checkpoint={root / 'run'}/checkpoint-{S}"]))  # fmt: skip
    assert (elsewhere.output_dir, elsewhere.max_steps) == (str(root / "mine"), S + 3)


def _refusal(overrides) -> str:
    with pytest.raises(OptiplugError) as info:
        validate_run(load_config(None, overrides))
    return str(info.value)


def test_every_other_change_stays_refused_and_a_cooldown_resumes_only_as_itself(branched):
    root, _, cooldown = branched
    checkpoint = f"training.resume_from_checkpoint={root / 'run'}/checkpoint-{S}"
    common = [*BASE, *WSD, f"training.output_dir={root / 'run'}", checkpoint]
    assert _refusal([*common, "cooldown.steps=4", "optimizer.lr=0.01"]).startswith(
        "training.resume_from_checkpoint: optimizer.lr=0.01 (checkpoint: 0.001): a resumed run continues"
    )
    assert "scheduler.min_lr_ratio=0.2 (checkpoint: 0.1)" in _refusal([*common, "cooldown.steps=4",
                                                                        "scheduler.min_lr_ratio=0.2"])  # fmt: skip
    assert _refusal([*common, "cooldown.steps=4", "cooldown.min_lr_ratio=1"]) == (
        f"cooldown: the rate at '{root / 'run'}/checkpoint-{S}' is 1 x lr, already at or below the floor 1 x lr: "
        "branch from a checkpoint of the stable phase, or lower cooldown.min_lr_ratio"
    )
    assert _refusal([*BASE, "cooldown.steps=4"]) == (
        "cooldown.steps: a cooldown branches from a checkpoint: set training.resume_from_checkpoint=OUT/checkpoint-N"
    )
    own = f"training.resume_from_checkpoint={cooldown.output_dir}/checkpoint-{S + C}"
    assert _refusal([*BASE, *WSD, f"training.output_dir={root / 'run'}", own]) == (
        f"training.resume_from_checkpoint: '{cooldown.output_dir}/checkpoint-{S + C}' was written by a cooldown of "
        f"{C} steps from step {S}: resume it with cooldown.steps={C}"
    )
    assert _refusal([*BASE, *WSD, f"training.output_dir={root / 'run'}", own, "cooldown.steps=9"]).startswith(
        f"cooldown: '{cooldown.output_dir}/checkpoint-{S + C}' is in a cooldown of {C} steps from step {S} (1-sqrt "
        "to 0.1 x lr); resume it with the same cooldown, or branch a new one from"
    )
    # the same cooldown resumes into its own directory and continues it there
    args = validate_run(
        load_config(None, [*BASE, *WSD, f"training.output_dir={root / 'run'}", own, f"cooldown.steps={C}"])
    )
    assert (args.output_dir, args.max_steps) == (str(cooldown.output_dir), S + C)


def test_a_schedule_without_a_stable_rate_cannot_be_branched(tmp_path):
    out = tmp_path / "cosine"
    optiplug.app.train(overrides=[*BASE, "training.max_steps=1", "training.save_steps=1", f"training.output_dir={out}"],
                   quiet=True)  # fmt: skip
    message = _refusal([*BASE, f"training.output_dir={out}", f"training.resume_from_checkpoint={out}/checkpoint-1",
                        "cooldown.steps=4"])  # fmt: skip
    assert message == (
        f"cooldown: '{out}/checkpoint-1' was trained with scheduler 'cosine', whose rate follows the whole run: it "
        "has no stable rate to branch a cooldown from; train with scheduler.name=warmup_stable_decay (or constant) "
        "to branch cooldowns from its checkpoints"
    )


@pytest.mark.slow
def test_a_cooldown_from_a_constant_schedule_takes_its_own_shape_and_floor(tmp_path):
    """constant has no decay: the cooldown's decay_type and min_lr_ratio; equal to WSD(0, S, C) with them, to the bit."""
    run = tmp_path / "run"
    optiplug.app.train(overrides=[*BASE, "scheduler.name=constant", f"training.max_steps={S}", f"training.save_steps={S}",
                              f"training.output_dir={run}"], quiet=True)  # fmt: skip
    cooldown = optiplug.app.train(
        overrides=[*BASE, "scheduler.name=constant", f"training.output_dir={run}", f"cooldown.steps={C}",
                   "cooldown.decay_type=linear", "cooldown.min_lr_ratio=0.25",
                   f"training.resume_from_checkpoint={run}/checkpoint-{S}"],
        quiet=True,
    )  # fmt: skip
    reference = optiplug.app.train(
        overrides=[*BASE, "scheduler.name=warmup_stable_decay", f"scheduler.stable_steps={S}", f"scheduler.decay_steps={C}",
                   "scheduler.decay_type=linear", "scheduler.min_lr_ratio=0.25", f"training.max_steps={S + C}",
                   f"training.output_dir={tmp_path / 'reference'}"],
        quiet=True,
    )  # fmt: skip
    ours, theirs = _steps(cooldown.output_dir), _steps(reference.output_dir)
    assert sorted(ours) == list(range(1, S + C + 1)) and {step: theirs[step] for step in ours} == ours
    assert cooldown.summary["cooldown"]["decay_type"] == "linear" and math.isclose(
        ours[S + C][1], 1e-3 * (0.25 * 0.75 + 0.25)
    )
