"""muon under DDP: 2 processes (torchrun, gloo, CPU) log the losses of 1 process at the same global batch.

This file is also the worker: ``python -m torch.distributed.run --nproc_per_node 2 test_muon_ddp.py OUT``
trains STEPS steps with a checkpoint half-way, then resumes from it, and rank 0 writes the losses and
how many matrices Muon received on each rank (as tests/test_distributed.py does for the core).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
STEPS = 4
B = 2  # per-device batch of the 2-process run; the 1-process reference uses 2 * B
RTOL = 1e-5  # only the order of the gradient reduction differs
# Newton–Schulz in float32: in bfloat16 (torch.optim.Muon's) a 1e-7 difference between the two gradient sums can
# round an update differently, which says nothing about DDP (on an AMD EPYC here: 1.6e-4 apart by step 4).
OPTIMIZER = {"name": "muon", "ns_dtype": "float32", "weight_decay": 0.05, "adjust_lr": "spectral"}
ENGINES = {"fsdp1": 1, "fsdp2": 2}  # fsdp_config.version; DeepSpeed: test_muon_deepspeed.py, FSDP2: test_muon_fsdp2.py
FSDP1 = (
    "muon orthogonalizes each whole weight matrix, and FSDP version 1 flattens each unit's weights into one 1-D "
    "parameter; train with FSDP2 (fsdp_config.version: 2), DDP or a single process"
)


def _train(output_dir: Path, batch: int, resume: str | None = None, **arguments) -> dict:
    import optiplug
    from optiplug.testing import TokenBlocks, tiny_llama, training_args

    args = training_args(output_dir, max_steps=STEPS, per_device_train_batch_size=batch, **arguments)
    trainer = optiplug.OptiTrainer(model=tiny_llama(seed=0), args=args, train_dataset=TokenBlocks(n=64),
                                   optimizer=OPTIMIZER)  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    raw = optiplug.unwrap_optimizer(trainer.optimizer)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "losses": {h["step"]: h["loss"] for h in logged},
        "muon_matrices": sum(len(g["params"]) for g in raw.param_groups if g["use_muon"]),
        "distributed": trainer.optiplug_context().distributed,
        "world_size": trainer.args.world_size,
    }


def _same(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert math.isclose(got[step], expected[step], rel_tol=RTOL), (step, got, expected)


@pytest.mark.slow
def test_two_processes_match_one_process_with_twice_the_batch_and_resume(tmp_path):
    import torch

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(HERE)]
    result = subprocess.run([*command, str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    got = json.loads((tmp_path / "result.json").read_text())

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _train(tmp_path / "single", 2 * B)
    finally:
        torch.set_num_threads(threads)
    for run in got["ranks"]:
        assert run["distributed"] == "ddp" and run["world_size"] == 2
        assert run["muon_matrices"] == single["muon_matrices"] == 14  # every rank's Muon gets the whole matrices
    losses = {int(step): loss for step, loss in got["ranks"][0]["losses"].items()}
    _same(losses, single["losses"])
    resumed = {int(step): loss for step, loss in got["resumed"].items() if int(step) > STEPS // 2}
    _same(resumed, {step: loss for step, loss in single["losses"].items() if step > STEPS // 2})
    # the check with real TrainingArguments of the sharding engines, inside the 2-process launch
    assert got["checks"] == {"fsdp1": FSDP1, "fsdp2": None}


def _worker(root: Path) -> None:
    import torch.distributed as dist

    save = {"save_strategy": "steps", "save_steps": STEPS // 2}
    run = _train(root / "ddp", B, **save)
    ranks: list[dict | None] = [None, None]
    dist.all_gather_object(ranks, run)
    resumed = _train(root / "resumed", B, resume=str(root / "ddp" / f"checkpoint-{STEPS // 2}"))
    checks = {engine: _check(root / engine, version) for engine, version in ENGINES.items()}
    if dist.get_rank() == 0:
        (root / "result.json").write_text(json.dumps({"ranks": ranks, "resumed": resumed["losses"], "checks": checks}))


def _check(output_dir: Path, version: int) -> str | None:
    import optiplug
    from optiplug.testing import tiny_llama, training_args

    fsdp = {"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "version": version}
    entry = optiplug.get_entry("muon")
    try:
        ctx = optiplug.BuildContext(model=tiny_llama(), args=training_args(output_dir, fsdp=True, fsdp_config=fsdp))
        entry.check(ctx, entry.config())
    except optiplug.ConfigError as error:
        return str(error)
    return None


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
    from optiplug.process_group import exit_process

    exit_process(0)  # not the interpreter's teardown, which can abort beside gloo's threads
