"""adam_mini under DeepSpeed on this CPU machine: two real processes (torchrun, gloo) vs one process.

ZeRO stages 1-3 hand the optimizer flat 1-D partitions, on which adam-mini 1.1 fails at its first step
(``IndexError: too many indices for tensor of dimension 1``, as LLaMA-Factory users report): the plugin's
check refuses them before any step, under the real launch. ZeRO stage 0 (DeepSpeed as plain data
parallelism) trains with the same losses as one process with twice the batch.

This file is also the worker script: ``python -m torch.distributed.run --nproc_per_node 2 THIS OUT``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

STEPS, BATCH = 4, 2
OPTIMIZER = {"name": "adam_mini", "lr": 3e-3, "weight_decay": 0.1}


def zero(stage: int) -> dict[str, Any]:
    """The DeepSpeed config of the repository's examples, at ``stage``."""
    config = json.loads((Path(__file__).resolve().parents[3] / "examples" / "deepspeed-zero3.json").read_text())
    config["zero_optimization"] = {"stage": stage} if stage < 3 else config["zero_optimization"]
    return config


def trainer(output_dir: Path, batch: int, **arguments: Any):
    import optiplug
    from optiplug.testing import TokenBlocks, tiny_llama, training_args

    args = training_args(output_dir, max_steps=STEPS, per_device_train_batch_size=batch, **arguments)
    return optiplug.OptiTrainer(
        model=tiny_llama(seed=0), args=args, train_dataset=TokenBlocks(n=64), optimizer=OPTIMIZER
    )


def train(output_dir: Path, batch: int, **arguments: Any) -> dict[int, float]:
    from optiplug.testing import logged_losses

    run = trainer(output_dir, batch, **arguments)
    run.train()
    return logged_losses(run)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_zero_stage_0_trains_and_stages_2_and_3_are_refused_under_torchrun(tmp_path):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        __file__,
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2 and result["engine"] == "DeepSpeedEngine"
    for stage in (2, 3):
        assert result["refused"][str(stage)] == (
            f"adam_mini cannot train under DeepSpeed ZeRO stage {stage}: ZeRO hands the optimizer flat 1-D partitions "
            "of the weights, and adam-mini's per-head and per-row blocks need the weight matrices (it fails at the "
            "first step); set zero_optimization.stage to 0, or train with FSDP2 (fsdp_config.version: 2), DDP or in one process"
        )
    zero0 = {int(step): loss for step, loss in result["losses"].items()}
    single = train(tmp_path / "single", 2 * BATCH)
    assert sorted(zero0) == sorted(single) == list(range(1, STEPS + 1))
    for step in single:
        assert math.isclose(zero0[step], single[step], rel_tol=1e-5), (step, zero0[step], single[step])
    assert "Adam-mini" not in done.stdout


if __name__ == "__main__":
    import warnings

    import optiplug

    warnings.simplefilter("ignore")
    out = Path(sys.argv[1])
    run = trainer(out / "zero0", BATCH, deepspeed=zero(0))
    run.train()
    from optiplug.testing import logged_losses

    refused = {}
    for stage in (2, 3):
        try:
            trainer(out / f"zero{stage}", BATCH, deepspeed=zero(stage)).check_optimizer()
        except optiplug.ConfigError as error:
            refused[stage] = str(error)
    if int(os.environ.get("RANK", "0")) == 0:
        result = {
            "losses": logged_losses(run),
            "refused": refused,
            "world_size": run.args.world_size,
            "engine": type(run.model_wrapped).__name__,
        }
        (out / "result.json").write_text(json.dumps(result))
    from optiplug.process_group import exit_process

    exit_process(0)  # not the interpreter's teardown, which can abort beside gloo's threads
