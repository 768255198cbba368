"""Issue 19, class B: a run that would claim success with a wrong result is refused before anything is written.

(Bridged optimizer fields and per-group options are tested with the one check path, elsewhere.)
"""

from __future__ import annotations

import pytest

import optiplug
from optiplug import ConfigError
from optiplug.app.testing import run_cli

FAST = [
    "data.block_size=16",
    "data.max_blocks=32",
    "training.max_steps=4",
    "training.per_device_train_batch_size=4",
    "training.logging_steps=1",
    "training.disable_tqdm=true",
]


def cli(*argv: str) -> tuple[int, str]:
    """Exit code and the last ``optiplug: ...`` line of stderr."""
    code, _, err = run_cli(*argv)
    lines = [line for line in err.splitlines() if line.startswith("optiplug: ")]
    return code, lines[-1] if lines else ""


# ---- a warmup not shorter than the run: the rate never reaches optimizer.lr --------------------------


def _with_warmup() -> list[str]:
    """Every registered scheduler (any plugin's) whose config has a warmup."""
    return sorted(row.name for row in optiplug.list_schedulers() if "warmup_steps" in row.entry.config.model_fields)


def test_every_scheduler_with_a_warmup_is_checked():
    assert {"cosine", "linear", "warmup_stable_decay", "constant_with_warmup", "po_warmup_stable_decay"} <= set(
        _with_warmup()
    )
    for name in _with_warmup():
        assert optiplug.get_scheduler_entry(name).check is not None, name


@pytest.mark.parametrize("name", _with_warmup())
def test_a_warmup_not_shorter_than_the_run_is_refused_by_every_scheduler_with_one(name):
    def build(**fields):
        import torch

        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
        return optiplug.build_scheduler(optimizer, {"name": name, **fields}, num_training_steps=4)

    with pytest.raises(ConfigError) as info:
        build(warmup_steps=50, **({"stable_steps": 0} if name == "warmup_stable_decay" else {}))
    assert str(info.value) == (
        f"scheduler {name!r}: warmup_steps=50 is not shorter than the run's 4 steps, so the rate would never reach "
        "the optimizer's learning rate: shorten the warmup or train longer"
    )  # WSD without stable_steps says that its warmup and decay exceed the run (tests/test_validate_equals_train.py)
    ratio = r"warmup_ratio=0\.9 \(4 steps\) is not shorter than the run's 4 steps"
    wsd = r"warmup \(4\) and decay \(1\) steps exceed the run's 4 steps"
    with pytest.raises(ConfigError, match=wsd if name == "warmup_stable_decay" else ratio):
        build(warmup_ratio=0.9)
    build(warmup_steps=2)  # shorter: accepted


def test_a_long_warmup_is_refused_by_validate_and_by_train_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    message = (
        "optiplug: scheduler 'cosine': warmup_steps=50 is not shorter than the run's 4 steps, so the rate would never "
        "reach the optimizer's learning rate: shorten the warmup or train longer"
    )
    run = tmp_path / "run.yaml"
    run.write_text(f"training: {{max_steps: 4, output_dir: {out}}}\nscheduler: {{name: cosine, warmup_steps: 50}}\n")
    assert cli("validate", str(run)) == (1, message)
    assert cli("train", str(run), *FAST) == (1, message)
    assert not out.exists()


# ---- a schedule that follows the eval loss in a run that never evaluates -------------------------------


@pytest.mark.parametrize("name", ["reduce_lr_on_plateau", "greedy"])
def test_a_schedule_on_the_eval_loss_is_refused_without_evaluation(tmp_path, name):
    out = tmp_path / "run"
    message = (
        f"optiplug: scheduler {name!r} changes the rate only after an evaluation, and eval_strategy is 'no': the rate "
        "would never change; evaluate during training (an evaluation dataset and eval_strategy 'steps'), or choose "
        "another scheduler"
    )
    run = tmp_path / "run.yaml"
    run.write_text(f"training: {{max_steps: 4, output_dir: {out}}}\nscheduler: {name}\n")
    assert cli("validate", str(run)) == (1, message)
    assert cli("train", str(run), *FAST) == (1, message)
    assert not out.exists()
    # with evaluation data the run evaluates: accepted (tests/test_evaluation.py trains it)
    assert cli("validate", str(run), "data.eval_ratio=0.2") == (0, "")
    # in a Trainer of one's own: refused when its arguments never evaluate, as transformers refuses its own
    from optiplug.testing import TokenBlocks, tiny_llama, training_args

    trainer = optiplug.OptiTrainer(
        model=tiny_llama(), args=training_args(tmp_path), train_dataset=TokenBlocks(n=8), scheduler=name
    )
    with pytest.raises(ConfigError, match="changes the rate only after an evaluation, and eval_strategy is 'no'"):
        trainer.create_optimizer_and_scheduler(num_training_steps=6)


# ---- pure float16 training --------------------------------------------------------------------------


def test_float16_weights_are_refused_for_training_and_a_lora_adapter_on_them_is_not(tmp_path):
    from optiplug.app.run import PURE_FLOAT16

    out = tmp_path / "run"
    run = tmp_path / "run.yaml"
    run.write_text(f"training: {{max_steps: 4, output_dir: {out}}}\nmodel: {{dtype: float16}}\n")
    assert cli("validate", str(run)) == (1, f"optiplug: {PURE_FLOAT16}")
    assert cli("train", str(run), *FAST) == (1, f"optiplug: {PURE_FLOAT16}")
    assert cli("validate", str(run), "finetuning.type=freeze", "finetuning.trainable=[norm]") == (
        1,
        f"optiplug: {PURE_FLOAT16}",
    )
    assert not out.exists()
    assert cli("validate", str(run), "finetuning.type=lora") == (0, "")  # the adapter is float32
    assert cli("validate", str(run), "model.dtype=bfloat16") == (0, "")


# ---- a checkpoint without optiplug's record of its optimizer and schedule ------------------------------


def test_a_checkpoint_without_optiplugs_record_is_refused_for_resume(tmp_path):
    # A plain Trainer's checkpoint: what optiplug train writes, less optiplug_config.json. Resumed with
    # optimizer.lr=0.1, the Trainer loaded the checkpoint's optimizer and schedule (lr 0.001 continued) while
    # summary.json said lr 0.1.
    from optiplug.app.safety import CHECKPOINT_RECORD

    first = optiplug.train(
        overrides=[*FAST, "training.save_steps=2", f"training.output_dir={tmp_path / 'plain'}"], quiet=True
    )
    checkpoint = first.output_dir / "checkpoint-2"
    (checkpoint / CHECKPOINT_RECORD).unlink()
    out = tmp_path / "resumed"
    message = (
        f"optiplug: training.resume_from_checkpoint: '{checkpoint}' has no {CHECKPOINT_RECORD} (it was not saved by "
        "optiplug train), so nothing says which optimizer and schedule it was trained with, and a resume would "
        "continue its own learning rates and optimizer settings whatever the optimizer and scheduler sections say; "
        f"start a new run from its weights (model.name_or_path={checkpoint})"
    )
    resume = [*FAST, f"training.output_dir={out}", f"training.resume_from_checkpoint={checkpoint}"]
    assert cli("train", *resume, "optimizer.lr=0.1") == (1, message)
    assert cli("train", *resume) == (1, message)  # the same config cannot be told from another one
    run = tmp_path / "run.yaml"
    run.write_text("{}\n")
    assert cli("validate", str(run), *resume) == (1, message)
    assert not out.exists()
    # an unreadable record is refused too, never guessed
    (checkpoint / CHECKPOINT_RECORD).write_text("{not json")
    code, line = cli("train", *resume)
    assert code == 1 and line == (
        f"optiplug: training.resume_from_checkpoint: '{checkpoint / CHECKPOINT_RECORD}' cannot be read as optiplug's "
        "record of the checkpoint's optimizer and scheduler; resume from another checkpoint, or start a new run from "
        f"its weights (model.name_or_path={checkpoint})"
    )
    # its weights start a new run, as the line says
    fresh = optiplug.train(overrides=[*FAST, f"model.name_or_path={checkpoint}", f"training.output_dir={out}"],
                           quiet=True)  # fmt: skip
    assert fresh.summary["status"] == "finished"
