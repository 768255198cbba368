"""Schedule-free under DDP on this CPU machine: two real processes (torchrun, gloo) vs one process.

Every process switches its own full copy of the weights around a save; the checkpoints hold x,
and the losses are those of one process with twice the batch.

This file is also the worker script: ``python -m torch.distributed.run --nproc_per_node 2 THIS OUT``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

STEPS, BATCH = 4, 2
OPTIMIZER = {"name": "schedule_free_adamw", "lr": 1e-2, "warmup_steps": 2}


def trainer(output_dir: Path, batch: int, callbacks: Sequence[Any] = (), **arguments: Any):
    import optiplug
    from optiplug.testing import TokenBlocks, tiny_llama, training_args

    args = training_args(output_dir, max_steps=STEPS, per_device_train_batch_size=batch, **arguments)
    return optiplug.OptiTrainer(
        model=tiny_llama(seed=0),
        args=args,
        train_dataset=TokenBlocks(n=64),
        optimizer=OPTIMIZER,
        scheduler="constant",
        callbacks=list(callbacks),
    )


@pytest.mark.slow
def test_ddp_checkpoints_hold_x_and_losses_match_one_process(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run([*command, str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2 and result["engine"] == "DistributedDataParallel"
    assert result["saved_x"] == {"2": True, "4": True}  # each checkpoint equals x from the live optimizer
    assert result["saved_y"] == {"2": False, "4": False}

    from optiplug.testing import logged_losses

    single = trainer(tmp_path / "single", 2 * BATCH)
    single.train()
    one = logged_losses(single)
    ddp = {int(step): loss for step, loss in result["losses"].items()}
    assert sorted(ddp) == sorted(one) == list(range(1, STEPS + 1))
    for step in one:
        assert math.isclose(ddp[step], one[step], rel_tol=1e-5), (step, ddp[step], one[step])


if __name__ == "__main__":
    import warnings

    import torch
    from optiplug_schedulefree.optim import schedule_free_optimizer
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    warnings.simplefilter("ignore")
    out = Path(sys.argv[1])
    rank = int(os.environ.get("RANK", "0"))

    class Compare(TrainerCallback):
        """On rank 0, after each save: is the checkpoint x (from the live optimizer's eval()) or y?"""

        def __init__(self) -> None:
            self.run: Any = None
            self.x: dict[str, bool] = {}
            self.y: dict[str, bool] = {}

        def on_save(self, args, state, control, **kwargs):
            wrapped, model = self.run.optimizer, self.run.model
            y = {n: p.detach().clone() for n, p in model.named_parameters()}
            wrapped.eval()
            x = {n: p.detach().clone() for n, p in model.named_parameters()}
            wrapped.train()
            assert schedule_free_optimizer(wrapped).in_train_mode
            if rank == 0:
                saved = load_file(str(out / "ddp" / f"checkpoint-{state.global_step}" / "model.safetensors"))
                self.x[str(state.global_step)] = all(torch.equal(saved[n], x[n]) for n in x)
                self.y[str(state.global_step)] = all(torch.equal(saved[n], y[n]) for n in y)

    compare = Compare()
    run = trainer(out / "ddp", BATCH, [compare], save_strategy="steps", save_steps=2)
    compare.run = run
    run.train()
    from optiplug.testing import logged_losses

    if rank == 0:
        result = {
            "losses": logged_losses(run),
            "saved_x": compare.x,
            "saved_y": compare.y,
            "world_size": run.args.world_size,
            "engine": type(run.model_wrapped).__name__,
        }
        (out / "result.json").write_text(json.dumps(result))
    from optiplug.process_group import exit_process

    exit_process(0)  # not the interpreter's teardown, which can abort beside gloo's threads
