"""`optiplug train` resumes from `training.resume_from_checkpoint` and reproduces the uninterrupted run."""

from __future__ import annotations

import optiplug
import optiplug.app

SMALL = [
    "data.block_size=32",
    "data.max_blocks=64",
    "training.per_device_train_batch_size=4",
    "training.logging_steps=1",
]


def test_resume_from_checkpoint_reproduces_the_run(tmp_path):
    full = optiplug.app.train(
        None,
        [
            *SMALL,
            f"training.output_dir={tmp_path / 'full'}",
            "training.max_steps=6",
            "training.save_strategy=steps",
            "training.save_steps=3",
        ],
    )
    resumed = optiplug.app.train(
        None,
        [
            *SMALL,
            f"training.output_dir={tmp_path / 'resumed'}",
            "training.max_steps=6",
            f"training.resume_from_checkpoint={tmp_path / 'full' / 'checkpoint-3'}",
        ],
    )
    reference = dict(full.losses)
    after = {step: loss for step, loss in resumed.losses if step > 3}
    assert sorted(after) == [4, 5, 6]
    assert all(after[step] == reference[step] for step in after), (after, reference)
    assert resumed.summary["steps"] == 6
    assert resumed.summary["tokens"] == full.summary["tokens"] // 2  # throughput counts this session's 3 steps


def test_engines_without_a_launcher_are_one_clear_error(tmp_path):
    import pytest

    with pytest.raises(optiplug.ConfigError, match=r"training.fsdp: .* runs in processes started by a launcher"):
        optiplug.app.train(None, [*SMALL, f"training.output_dir={tmp_path}", "training.fsdp=full_shard"])
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_a_missing_checkpoint_is_one_clear_error_before_anything_is_written(tmp_path):
    import pytest

    out = tmp_path / "out"
    with pytest.raises(optiplug.CheckpointError) as info:
        optiplug.app.train(
            None, [*SMALL, f"training.output_dir={out}", f"training.resume_from_checkpoint={tmp_path / 'nope'}"]
        )
    assert str(info.value) == (
        f"training.resume_from_checkpoint: '{tmp_path / 'nope'}' does not exist; give a checkpoint-N directory of an earlier run"
    )
    assert not out.exists()
