"""Ctrl-C and SIGTERM during a run: it stops at once, at any moment, and a second signal ends the process.

* **The first SIGINT (Ctrl-C) or SIGTERM** (Slurm, ``docker stop``, ``timeout``) raises
  ``KeyboardInterrupt`` (:class:`Terminated` for SIGTERM) wherever the run is: start-up, a step, an
  evaluation, a checkpoint save. The run's ``finally`` blocks run: an unfinished checkpoint is
  dropped (:mod:`optiplug.app.checkpoints`), the run marker says ``interrupted``, and ``optiplug
  train`` prints the step and the last complete checkpoint and exits with 130 (SIGTERM: 143). A
  callback raises it again at the next step, evaluation batch or save, should a library have
  swallowed it.
* **A second signal** while the run cleans up ends the process at once (``os._exit``, same code).
* **A signal the process ignores stays ignored**: a shell starts a background job (``cmd &`` in a
  script) with SIGINT ignored; such a run stops on SIGTERM.
* **Under torchrun** every process gets the signal (torchrun forwards SIGINT and SIGTERM to each
  one, then kills what is left after 30 s); each stops on its own as above.
* **transformers' ``enable_jit_checkpoint``** installs its own SIGTERM handler when the Trainer is
  built: it then decides (a checkpoint 3 s later, at the next step, and a "finished" training
  loop). optiplug wraps that handler: it still runs, and the run then ends as interrupted (exit 143,
  no final model, the marker ``interrupted``), not as finished. Ctrl-C is optiplug's either way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["EXIT_CODES", "Signals", "Terminated", "again_callback", "stop_on_signals"]

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Terminated(KeyboardInterrupt):
    """The run received SIGTERM: stopped as for Ctrl-C (exit status 143)."""


class Signals:
    """What :func:`stop_on_signals` saw: the first signal it handled (None: none yet), and whether a SIGTERM
    went to transformers' JIT checkpoint handler instead."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.handed_over = False
        self.trainer: Any = None  # the run's Trainer, once built

    def interruption(self) -> KeyboardInterrupt:
        return Terminated() if self.received == signal.SIGTERM else KeyboardInterrupt()

    def raise_if_received(self) -> None:
        """Raise the interruption again (a library swallowed the first one); for callbacks."""
        if self.received is not None:
            raise self.interruption()

    def hand_over_sigterm(self) -> None:
        """Let the SIGTERM handler someone installed over ours (transformers' JIT checkpoint) handle it, noting
        that it came: the run ends as interrupted when that handler has stopped the training loop."""
        handler = signal.getsignal(signal.SIGTERM)
        if threading.current_thread() is not threading.main_thread() or not callable(handler):
            return

        def noted(signum: int, frame: Any) -> Any:
            self.handed_over = True
            return handler(signum, frame)

        signal.signal(signal.SIGTERM, noted)

    def raise_if_handed_over(self) -> None:
        if self.handed_over:
            self.received = signal.SIGTERM
            raise Terminated()


def _second(signum: int, frame: Any) -> None:
    os.write(2, b"optiplug: stopped at once (second signal)\n")
    os._exit(EXIT_CODES.get(signal.Signals(signum), 130))


@contextlib.contextmanager
def stop_on_signals() -> Iterator[Signals]:
    """For the length of a run: SIGINT and SIGTERM stop it as described above; the previous handlers after.

    Outside the main thread (signals cannot be handled there) it changes nothing.
    """
    signals = Signals()
    if threading.current_thread() is not threading.main_thread():
        yield signals
        return

    def first(signum: int, frame: Any) -> None:
        signals.received = signum
        for each in previous:
            signal.signal(each, _second)
        raise signals.interruption()

    # A signal the process was told to ignore stays ignored: a shell starts a background job (`&` in a script)
    # with SIGINT ignored, and Python then installs no KeyboardInterrupt handler either.
    previous = {each: signal.getsignal(each) for each in EXIT_CODES if signal.getsignal(each) != signal.SIG_IGN}
    for each in previous:
        signal.signal(each, first)
    try:
        yield signals
    finally:
        for each, handler in previous.items():
            signal.signal(each, handler if handler is not None else signal.SIG_DFL)


def again_callback(signals: Signals) -> Any:
    """A TrainerCallback that raises the interruption again at the next step, evaluation batch, save or log,
    should a library have swallowed the first one."""
    from transformers import TrainerCallback

    class StopAgain(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            signals.raise_if_received()

        on_step_end = on_substep_end = on_prediction_step = on_save = on_log = on_evaluate = on_step_begin

    return StopAgain()
