"""The default plugin's torch.optim optimizers: the kernel choice (``kernel``, formerly ``implementation``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import optiplug
from optiplug.testing import tiny_llama


@pytest.mark.parametrize(
    ("kernel", "expected"),
    [("auto", (True, None)), ("fused", (True, None)), ("foreach", (False, True)), ("for-loop", (False, False))],
)
@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_the_kernel_field_picks_torchs_kernel(name, kernel, expected):
    optimizer = optiplug.build_optimizer(tiny_llama(), name, kernel=kernel)
    assert (optimizer.defaults["fused"], optimizer.defaults["foreach"]) == expected


def test_implementation_is_read_as_kernel():
    """Configs written up to 0.1 (user YAMLs, checkpoints' optiplug_config.json) name the field ``implementation``."""
    assert optiplug.parse_optimizer({"name": "adamw", "implementation": "foreach"}).kernel == "foreach"
    assert optiplug.parse_optimizer({"name": "adam", "implementation": "for-loop"}).kernel == "for-loop"
    assert optiplug.parse_optimizer({"name": "adamw", "implementation": "fused", "kernel": "fused"}).kernel == "fused"
    assert optiplug.parse_optimizer("adamw_torch_fused").kernel == "fused"
    optimizer = optiplug.build_optimizer(tiny_llama(), "adamw", implementation="foreach")
    assert (optimizer.defaults["fused"], optimizer.defaults["foreach"]) == (False, True)
    assert "implementation" not in optiplug.parse_optimizer({"name": "adamw", "implementation": "fused"}).model_dump()


def test_implementation_and_kernel_that_disagree_are_refused():
    with pytest.raises(optiplug.ConfigError, match="implementation is the old name of kernel: set kernel only"):
        optiplug.parse_optimizer({"name": "adamw", "implementation": "foreach", "kernel": "fused"})
    with pytest.raises(optiplug.ConfigError, match="implementation is the old name of kernel"):
        optiplug.parse_optimizer({"name": "adamw_torch_fused", "implementation": "foreach"})


def test_an_old_checkpoint_record_with_another_implementation_is_still_a_difference(tmp_path):
    """Reading ``implementation`` as ``kernel`` in a checkpoint's record hides no real change of kernel."""
    from optiplug.app.safety import check_checkpoint

    old = Path(__file__).parent / "fixtures" / "old_checkpoints" / "adamw" / "checkpoint-3"
    checkpoint = tmp_path / "checkpoint-3"
    shutil.copytree(old, checkpoint)
    record = json.loads((checkpoint / "optiplug_config.json").read_text())
    assert record["optimizer"]["implementation"] == "auto"  # the old name, as written before the rename
    given = {"name": "adamw", "lr": 0.01, "weight_decay": 0.01}
    scheduler = optiplug.parse_scheduler({"name": "cosine", "warmup_steps": 1})
    check_checkpoint(str(checkpoint), optiplug.parse_optimizer(given), scheduler, engine=False)
    with pytest.raises(optiplug.CheckpointError, match=r"optimizer\.kernel='foreach' \(checkpoint: 'auto'\)"):
        check_checkpoint(str(checkpoint), optiplug.parse_optimizer({**given, "kernel": "foreach"}), scheduler, False)
