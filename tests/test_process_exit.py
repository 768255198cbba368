"""A process of a torchrun launch ends without the interpreter teardown that aborted it (optiplug.process_group).

A finished 2-process run could end with ``terminate called without an active exception`` (exit -6)
on one rank, at random: a gloo worker thread released the last collective's work, which needs the
GIL, while the main thread was tearing the interpreter down. ``destroy_process_group()`` alone
does not stop those threads (DDP keeps the group alive), so such a process must end before the
teardown: its process group destroyed, the exit handlers run, then ``os._exit``.

Each process of a real 2-process torchrun launch (gloo) carries a probe (``sitecustomize``, imported
before anything else): its exit handler, which runs after every other one, records whether a
process group is still initialised; an object of it writes a file when the interpreter is torn
down. This file is also the worker script of a launch that trains with OptiTrainer.

And a launch stopped from outside: SIGTERM to torchrun, or to `optiplug train --nproc 2`, reaches every
process, each of which stops as interrupted (optiplug.app.stopping), sent from inside the run at step 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
GLOO_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")

PROBE = """
import atexit, json, os, sys

_DIR, _RANK = os.environ["EXIT_PROBE_DIR"], os.environ.get("RANK", "x")


def _record():
    dist = sys.modules.get("torch.distributed")
    with open(os.path.join(_DIR, f"exit-{_RANK}.json"), "w") as handle:
        json.dump({"initialized": bool(dist and dist.is_available() and dist.is_initialized())}, handle)


class _Teardown:
    def __del__(self, write=os.write, open_=os.open, path=os.path.join(_DIR, f"torn-down-{_RANK}")):
        write(open_(path, os.O_CREAT | os.O_WRONLY), b"the interpreter was torn down")


atexit.register(_record)
_teardown = _Teardown()
"""


def _launch(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(PROBE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EXIT_PROBE_DIR": str(tmp_path)}
    env["PYTHONPATH"] = os.pathsep.join([str(probe), *(p for p in sys.path if p)])
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *argv]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    assert "terminate called" not in done.stderr
    return done


def _assert_ended_before_teardown(tmp_path: Path) -> None:
    for rank in (0, 1):
        assert json.loads((tmp_path / f"exit-{rank}.json").read_text()) == {"initialized": False}
        assert not (tmp_path / f"torn-down-{rank}").exists()


def test_the_probe_sees_a_teardown(tmp_path):
    """Without a launcher a process exits as Python does (the probe would miss a teardown otherwise)."""
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "sitecustomize.py").write_text(PROBE)
    env = {**os.environ, "EXIT_PROBE_DIR": str(tmp_path), "PYTHONPATH": str(tmp_path / "probe")}
    subprocess.run([sys.executable, "-c", "pass"], env=env, check=True, timeout=120)
    assert (tmp_path / "torn-down-x").exists()


@pytest.mark.slow
def test_optiplug_train_under_torchrun_ends_before_the_teardown(tmp_path):
    out = tmp_path / "out"
    done = _launch(tmp_path, "-m", "optiplug", "train", "data.block_size=16", "data.max_blocks=16",
                   "training.max_steps=2", "training.per_device_train_batch_size=2",
                   "training.disable_tqdm=true", f"training.output_dir={out}")  # fmt: skip
    assert "optiplug: done" in done.stderr
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    _assert_ended_before_teardown(tmp_path)


@pytest.mark.slow
def test_a_worker_script_ends_before_the_teardown(tmp_path):
    """A script that trains with OptiTrainer under torchrun and ends with exit_process (as the test workers do)."""
    _launch(tmp_path, str(HERE), str(tmp_path))
    for rank in (0, 1):  # gloo's threads were running after the group was destroyed: a teardown would race them
        during = json.loads((tmp_path / f"during-{rank}.json").read_text())
        assert during["world_size"] == 2 and during["initialized_after_end"] is False
        assert set(GLOO_THREADS) <= set(during["threads_after_end"]), during
    _assert_ended_before_teardown(tmp_path)


SIGTERM_AT_STEP_2 = """
import os, signal, sys
from optiplug.app.trainer import GuardedTrainer

step = GuardedTrainer.training_step


def training_step(self, *args, **kwargs):
    if self.state.global_step == 2 and os.environ["RANK"] == "0" and not getattr(self, "told", False):
        self.told = True
        os.kill(os.getppid(), signal.SIGTERM)  # torchrun is told to stop, as Slurm or docker stop would
    return step(self, *args, **kwargs)


GuardedTrainer.training_step = training_step
sys.argv[0] = "optiplug"
from optiplug.app.cli import main

main()
"""


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_process_as_interrupted(tmp_path):
    (tmp_path / "sigterm.py").write_text(SIGTERM_AT_STEP_2)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(tmp_path / "sigterm.py"), "train", "data.block_size=16", "data.max_blocks=64",
               "training.max_steps=1000", "training.per_device_train_batch_size=2", "training.save_steps=1",
               "training.disable_tqdm=true", f"training.output_dir={out}"]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode != 0
    stopped = [line for line in done.stderr.splitlines() if line.startswith("optiplug: stopped by SIGTERM at step ")]
    assert len(stopped) == 2, done.stderr[-4000:]  # each process, on its own
    assert "terminate called" not in done.stderr and "stopped at once" not in done.stderr
    marker = json.loads((out / "optiplug_run.json").read_text())
    assert marker["status"] == "interrupted" and marker["signal"] == "SIGTERM"
    assert not (out / "summary.json").exists() and not (out / ".optiplug-partial").exists()


# Imported by every process (PYTHONPATH): process 0 of the launch sends SIGTERM to `optiplug train --nproc 2`.
NPROC_SIGTERM = """
import os

if os.environ.get("RANK") == "0":
    import signal

    from optiplug.app.trainer import GuardedTrainer

    step = GuardedTrainer.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step == 2 and not getattr(self, "told", False):
            self.told = True
            with open(f"/proc/{os.getppid()}/stat") as stat:  # torchrun's parent: the optiplug command
                os.kill(int(stat.read().rsplit(")", 1)[1].split()[1]), signal.SIGTERM)
        return step(self, *args, **kwargs)

    GuardedTrainer.training_step = training_step
"""


@pytest.mark.slow
def test_sigterm_to_optiplug_train_nproc_reaches_every_process(tmp_path):
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(NPROC_SIGTERM)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(probe), *(p for p in sys.path if p)])
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "optiplug", "train", "--nproc", "2", "data.block_size=16",
               "data.max_blocks=64", "training.max_steps=1000", "training.per_device_train_batch_size=2",
               "training.save_steps=1", "training.disable_tqdm=true", f"training.output_dir={out}"]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 143, done.stderr[-4000:]
    stopped = [line for line in done.stderr.splitlines() if line.startswith("optiplug: stopped by SIGTERM at step ")]
    assert len(stopped) == 2, done.stderr[-4000:]
    assert json.loads((out / "optiplug_run.json").read_text())["status"] == "interrupted"


# ---- the worker: this file run by torchrun ----------------------------------------------------------

if __name__ == "__main__":
    import torch.distributed as dist

    import optiplug
    from optiplug.process_group import end_process_group, exit_process
    from optiplug.testing import TokenBlocks, tiny_llama, training_args

    out = Path(sys.argv[1])
    args = training_args(out / "run", max_steps=2, per_device_train_batch_size=2)
    trainer = optiplug.OptiTrainer(model=tiny_llama(), args=args, train_dataset=TokenBlocks(n=16), optimizer="adamw")
    trainer.train()
    world_size = dist.get_world_size()
    end_process_group()
    threads = sorted(Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task"))
    during = {"world_size": world_size, "initialized_after_end": dist.is_initialized(), "threads_after_end": threads}
    (out / f"during-{os.environ['RANK']}.json").write_text(json.dumps(during))
    exit_process(0)
