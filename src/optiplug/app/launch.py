"""``optiplug train --nproc N``: hand the run to PyTorch's standard launcher.

optiplug has no process management of its own. ``--nproc N`` runs exactly what a user would
type::

    python -m torch.distributed.run --standalone --nproc_per_node N -m optiplug train CONFIG ...

and returns its exit code. torchrun starts the processes, sets ``RANK``/``WORLD_SIZE``/
``MASTER_ADDR``, and the Trainer (through accelerate) joins the process group: NCCL on GPUs,
gloo on CPUs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from optiplug.errors import ConfigError

__all__ = ["check_engine_launch", "relaunch_with_torchrun", "torchrun_command", "under_launcher"]

_ENGINES = {"fsdp": "FSDP", "deepspeed": "DeepSpeed"}


def under_launcher() -> bool:
    """True inside a process started by torchrun, accelerate launch, deepspeed or mpirun-style launchers."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def torchrun_command(nproc: int, argv_items: Sequence[str]) -> list[str]:
    """The torchrun command line that runs ``optiplug train ARGV_ITEMS`` in ``nproc`` processes on this machine."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "optiplug",
        "train",
        *argv_items,
    ]


def relaunch_with_torchrun(nproc: int, argv_items: list[str]) -> int:
    """Run ``optiplug train`` under torchrun with ``nproc`` local processes and wait for it.

    Args:
        nproc: processes to start on this machine (one per GPU, or CPU processes using gloo).
        argv_items: the config file and ``key=value`` overrides, as given to ``optiplug train``.

    Returns:
        torchrun's exit code (non-zero when any process failed).

    Raises:
        ConfigError: ``nproc`` is below 1, or this process was itself started by a launcher.
    """
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    if under_launcher():
        raise ConfigError(
            "--nproc starts torchrun, but this process already runs under a launcher (LOCAL_RANK/WORLD_SIZE set); "
            "drop --nproc and let the launcher set the number of processes"
        )
    # Its own session: a terminal's Ctrl-C reaches torchrun once, through this process (_wait_forwarding).
    return _wait_forwarding(subprocess.Popen(torchrun_command(nproc, argv_items), start_new_session=True))


_FORWARDED = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def _wait_forwarding(process: subprocess.Popen) -> int:
    """Wait for torchrun, passing it SIGINT, SIGTERM and SIGHUP (it passes them to every process, which stop as
    for Ctrl-C: optiplug.app.stopping). After a second signal this returns at once; torchrun, told twice, stops
    waiting for its processes too. Returns torchrun's exit status, or 128 + the first signal's number."""
    received: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signum)
        if len(received) > 1:
            raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        return process.wait()
    previous = {each: signal.signal(each, forward) for each in _FORWARDED}
    try:
        code = process.wait()
    except KeyboardInterrupt:
        code = -1
    finally:
        for each, handler in previous.items():
            signal.signal(each, handler if handler is not None else signal.SIG_DFL)
    return 128 + received[0] if received else code


def check_engine_launch(training: Mapping[str, Any]) -> None:
    """Refuse FSDP or DeepSpeed in a process that no launcher started, before anything is built.

    Without a launcher transformers fails deep inside (``Using fsdp only works in distributed
    training``; DeepSpeed looks for MPI and raises ``No module named 'mpi4py'``).

    Args:
        training: the run config's ``training`` section.

    Raises:
        ConfigError: ``training.fsdp`` or ``training.deepspeed`` is set and the process was not
            started by torchrun, accelerate launch or deepspeed.
    """
    if under_launcher():
        return
    for key, engine in _ENGINES.items():
        if training.get(key):
            raise ConfigError(
                f"training.{key}: {engine} runs in processes started by a launcher, and this one was not: run "
                f"`optiplug train CONFIG --nproc N` or `torchrun --nproc_per_node N -m optiplug train CONFIG`"
            )
