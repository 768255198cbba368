"""Checkpoints written whole or not at all (transformers 5.25 writes ``checkpoint-N`` in place).

``optiplug train``'s Trainer (:class:`~optiplug.app.trainer.GuardedTrainer`) saves each checkpoint
through :func:`save_whole`: every process writes its part (the Trainer's own save, DeepSpeed's and
FSDP's shards included) into ``PARTIAL/checkpoint-N`` inside the output directory, the main
process adds the optimizer and scheduler record (:data:`~optiplug.app.safety.CHECKPOINT_RECORD`),
the processes wait for each other, and the main process renames it to ``checkpoint-N``. A save cut
short (Ctrl-C, SIGTERM, a full disk, a crash) leaves at most ``PARTIAL``, which nothing takes for
a checkpoint (resuming from inside it is refused); the run removes it when it ends, and the next
save before writing. A failed save is reported with its own error, not a later one. The final model
goes the same way (:func:`save_model_whole`): its files are named in the run's marker before they
appear in the output directory, so a run killed while saving it can still be overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from optiplug.app.safety import CHECKPOINT_RECORD, last_checkpoint
from optiplug.errors import CheckpointError

__all__ = ["PARTIAL", "remove_partial", "save_model_whole", "save_whole", "write_record"]

PARTIAL = ".optiplug-partial"
"""The directory, inside the output directory, that holds a checkpoint while it is being written."""


def remove_partial(run_dir: Path | str) -> None:
    """Remove what an unfinished save left (the main process, when the run ends or before a save)."""
    shutil.rmtree(Path(run_dir) / PARTIAL, ignore_errors=True)


def write_record(trainer: Any, checkpoint: Path) -> None:
    """The optimizer and scheduler config (and a cooldown's schedule) the checkpoint was trained with."""
    record = {
        "optimizer": trainer.optimizer_config.model_dump(mode="json"),
        "scheduler": trainer.scheduler_config.model_dump(mode="json"),
    }
    cooldown = getattr(trainer, "optiplug_cooldown", None)
    if cooldown is not None:  # a cooldown's checkpoint resumes only as that cooldown
        record["cooldown"] = cooldown.record()
    (checkpoint / CHECKPOINT_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _replace(staged: Path, final: Path) -> None:
    """Rename ``staged`` to ``final``; an earlier ``final`` (the same step saved twice) goes only after."""
    old = final.with_name(final.name + ".replaced") if final.exists() else None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staged, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _open_partial(trainer: Any, run: Path) -> None:
    """An empty :data:`PARTIAL` in ``run``, named in the run's marker before anything is written into it; every
    process waits until the main one has made it."""
    if trainer.args.should_save:
        remove_partial(run)
        output = getattr(trainer, "optiplug_output", None)
        if output is not None:
            output.expect([PARTIAL])
        (run / PARTIAL).mkdir(parents=True)
    trainer.accelerator.wait_for_everyone()  # no process writes before the main one cleared it


def save_whole(trainer: Any, save: Callable[[], None], run_dir: str) -> None:
    """Run the Trainer's ``_save_checkpoint`` (``save``) into :data:`PARTIAL`, then rename it into ``run_dir``.

    The trainer redirects ``_get_output_dir`` to ``trainer.optiplug_partial`` while this sets it.

    Raises:
        CheckpointError: the save failed (a full disk, an unwritable file): the error it raised, the
            checkpoint named, nothing of it kept.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

    args, state = trainer.args, trainer.state
    run, partial = Path(run_dir), Path(run_dir) / PARTIAL
    name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
    staged, final = partial / name, Path(run_dir) / name
    _open_partial(trainer, run)
    trainer.optiplug_partial = partial
    try:
        save()
        if args.should_save:
            if state.best_model_checkpoint == os.path.join(partial, name):  # set by the save to where it wrote
                state.best_model_checkpoint = str(final)
                state.save_to_json(str(staged / "trainer_state.json"))
            write_record(trainer, staged)
    except Exception as error:
        if args.should_save:
            remove_partial(run)
        first = (str(error).strip().splitlines() or [""])[0]
        last = last_checkpoint(run)
        where = f"the last complete checkpoint is {last}" if last else "no complete checkpoint was saved"
        raise CheckpointError(
            f"could not save {name} in {str(run)!r} ({type(error).__name__}: {first}); nothing of it was kept and "
            f"{where}; free disk space (or choose another training.output_dir) and train again"
        ) from error
    finally:
        trainer.optiplug_partial = None
    trainer.accelerator.wait_for_everyone()  # every process wrote its part (DeepSpeed: its shards)
    if args.should_save:
        _replace(staged, final)
        remove_partial(run)
        rotate_checkpoints(str(run), args.save_total_limit, state.best_model_checkpoint, use_mtime=True)
    trainer.accelerator.wait_for_everyone()  # the checkpoint exists before any process goes on


def save_model_whole(trainer: Any, run_dir: str) -> None:
    """The final model (``trainer.save_model``), staged like a checkpoint: every process saves its part into
    ``PARTIAL/model``; the main process records the names in the run's marker, then moves them into ``run_dir``.

    A run killed while saving leaves only entries its marker names (``PARTIAL``, or model files already
    moved), so an overwrite removes them instead of refusing them as files optiplug did not record.
    """
    args = trainer.args
    run = Path(run_dir)
    staged = run / PARTIAL / "model"
    output = getattr(trainer, "optiplug_output", None)
    _open_partial(trainer, run)
    staged.mkdir(exist_ok=True)  # every process: none waits for another to make it
    trainer.save_model(str(staged))  # every process calls it (DeepSpeed/FSDP gather); only the main one writes
    trainer.accelerator.wait_for_everyone()  # every process wrote its part
    if args.should_save:
        names = sorted(os.listdir(staged))
        if output is not None:
            output.expect(names)
        for name in names:
            if (staged / name).is_dir():
                _replace(staged / name, run / name)
            else:
                os.replace(staged / name, run / name)
        remove_partial(run)
    trainer.accelerator.wait_for_everyone()  # the model is in place before any process goes on
