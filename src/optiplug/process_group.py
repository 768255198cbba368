"""How a process that joined a ``torch.distributed`` process group ends (no torch import of its own).

A process of a torchrun launch (gloo on CPU) that returns from its work normally can still abort
after the work is done, with ``terminate called without an active exception`` (SIGABRT, exit -6),
at random and more often on a busy machine; torchrun then reports the whole run as failed. The
cause, from a core dump of such a process: one of gloo's worker threads (``pt_gloo_runloop``)
releases the last collective's ``AsyncWork`` just after the main thread saw it complete; the work
holds a Python object (in its captured ``ThreadLocalState``), so releasing it takes the GIL; by
then the main thread is tearing the interpreter down (``Py_FinalizeEx``), and Python ends a thread
that asks for the GIL during finalization with ``pthread_exit``, whose unwinding through a C++
``noexcept`` destructor calls ``std::terminate``.

``destroy_process_group()`` (``Trainer.end()`` in transformers 5.25) does not prevent it: the
worker threads live as long as the C++ process group, which DDP, DeepSpeed and FSDP keep alive
after it is destroyed (pytorch/pytorch#190489 reports the abort; #179291, an atexit handler in
torch that was abandoned). What does prevent it is ending such a process the way
``multiprocessing`` ends its children: run the exit handlers while the interpreter is whole, then
``os._exit`` without the teardown that races with those threads (:func:`exit_process`).
``optiplug train`` under a launcher ends so, and so do :mod:`optiplug.testing_launch` and the test
worker scripts.
"""

from __future__ import annotations

import atexit
import os
import sys

__all__ = ["end_process_group", "exit_process"]


def end_process_group() -> bool:
    """Destroy ``torch.distributed``'s process groups, if this process has any (what ``Trainer.end()`` does).

    Call it once every process is done with the others: a collective started after it fails.

    Returns:
        True if a process group was destroyed.
    """
    dist = sys.modules.get("torch.distributed")  # never imported here: a process without it has no group
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return False
    dist.destroy_process_group()
    return True


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # closed or broken: nothing more to write
            pass


def exit_process(code: int) -> None:
    """End this process with ``code``: the process group destroyed, the exit handlers run, the output
    flushed, then ``os._exit`` (no interpreter teardown beside gloo's threads). Never returns.

    For the entry point of a process a launcher started, after its work (and after its last
    collective on every process).
    """
    try:
        end_process_group()
    except Exception as error:  # the exit code says how the work went; this only says why the end was unclean
        print(f"optiplug: could not destroy the process group: {error}", file=sys.stderr)
    _flush()
    atexit._run_exitfuncs()  # logging.shutdown, trackers' own handlers: everything a normal exit runs first
    _flush()
    os._exit(code)
