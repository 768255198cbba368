"""What keeps a run from losing work or reporting something untrue (no torch here: ``validate`` uses it).

* **The output directory rule.** ``training.output_dir`` may be a new or empty directory, or a
  directory holding an earlier optiplug run (it carries :data:`MARKER`, which lists every entry
  that run wrote). An earlier run is replaced only with ``training.overwrite_output_dir: true``,
  and then its entries are removed before training starts. A directory holding anything else
  (a file optiplug did not write) is refused, and so is the model's, the tokenizer's or the
  data's own directory: nothing a user wrote is ever deleted or overwritten. Resuming from a
  checkpoint inside the output directory continues that run there.
* **Before the first step**: the directory (or the nearest existing parent) must be writable,
  the resume checkpoint complete and saved with the same optimizer and scheduler config, the
  model's and checkpoint's weight files whole.
* **A failed run leaves no empty directory** it created.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
import struct
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optiplug.errors import CheckpointError, ConfigError, OptiplugError

__all__ = [
    "CHECKPOINT_RECORD",
    "MARKER",
    "MARKER_TMP",
    "OVERWRITE",
    "DivergedError",
    "OutputDir",
    "check_checkpoint",
    "check_output_dir",
    "check_weight_files",
    "last_checkpoint",
    "prepare_output_dir",
    "read_marker",
    "write_marker",
]

MARKER = "optiplug_run.json"
"""Written into the output directory when a run starts; lists what the run wrote when it ends."""
CHECKPOINT_RECORD = "optiplug_config.json"
"""Written into every ``checkpoint-N``: the optimizer and scheduler config the checkpoint was trained with."""
OVERWRITE = "overwrite_output_dir"
"""The ``training`` key (optiplug's, not a TrainingArguments field) that allows replacing an earlier run."""

MARKER_TMP = MARKER + ".tmp"
"""The marker being rewritten (a name only optiplug writes: never foreign, removed with the run)."""


def _entries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir())


class DivergedError(OptiplugError):
    """The run diverged (a rule of the run's ``guard`` section fired): it stopped at that step.

    Args:
        step: the first step that diverged.
        what: what was seen, in words (``summary.json``'s ``diverged``).
        checkpoint: the last checkpoint saved before ``step``, if any.
        advice: what to change, fitting the cause (``lower optimizer.lr``).
    """

    def __init__(self, step: int, what: str, checkpoint: str | None, advice: str = "lower optimizer.lr"):
        self.step, self.what, self.checkpoint = step, what, checkpoint
        where = (
            # a resume continues the checkpoint's optimizer config (a changed lr is refused): start from its weights
            f"the last checkpoint before it is {checkpoint}: {advice} and start a new run from its weights "
            f"(model.name_or_path={checkpoint})"
            if checkpoint
            else f"no checkpoint was saved before it; {advice} and train again"
        )
        super().__init__(f"training diverged at step {step}: {what}; no model was saved as the result; {where}")


def _inside(child: Path, parent: Path) -> bool:
    child, parent = child.expanduser().resolve(), parent.expanduser().resolve()
    return child == parent or parent in child.parents


def read_marker(out: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(record, None)``, ``(None, None)`` when ``out`` has no marker, or ``(None, why)`` when it cannot be read."""
    path = out / MARKER
    if not path.exists() and not path.is_symlink():
        return None, None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        return None, f"it cannot be read: {getattr(error, 'strerror', None) or error}"
    if not text.strip():
        return None, "it is empty"
    try:
        data = json.loads(text)
    except ValueError:
        return None, "it is cut off or not JSON"
    if not isinstance(data, dict) or not isinstance(data.get("status"), str):
        return None, "it is not an optiplug run record"
    files = data.get("files")
    if files is not None and not (isinstance(files, list) and all(isinstance(f, str) for f in files)):
        return None, "its list of files is not a list of names"
    return data, None


def _process_alive(record: dict[str, Any]) -> bool:
    """Whether the run that wrote a "running" marker is still running here (same host, its process alive)."""
    pid = record.get("pid")
    if not isinstance(pid, int) or record.get("host") != socket.gethostname() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, owned by someone else
        return True
    return True


def _recorded_entries(out: Path, field_name: str = "training.output_dir") -> tuple[dict[str, Any] | None, list[str]]:
    """``(marker, entries the earlier run recorded writing)`` of a non-empty ``out``; refuses, with one line, a
    directory holding anything else, a marker that cannot be read, or a run that did not record its files."""
    where = f"{field_name}: {str(out)!r}"
    keep = "move what you want to keep out of it and delete it, or choose another directory"
    record, problem = read_marker(out)
    entries = _entries(out)
    if problem:
        raise ConfigError(
            f"{where} holds an optiplug run whose {MARKER} is corrupt ({problem}), so optiplug cannot tell its "
            f"files from yours and deletes none; {keep}"
        )
    if record is None:
        foreign = [name for name in entries if name != MARKER_TMP]
        if foreign:
            _refuse_foreign(where, foreign)
        return None, entries  # only a marker's temporary file: a run killed while writing its first marker
    listed = set(record.get("files") or ()) | {MARKER, MARKER_TMP}
    unlisted = [name for name in entries if name not in listed]
    if record["status"] == "running":
        since = f"since {record['started']}" if record.get("started") else "with no start time"
        if _process_alive(record):
            raise ConfigError(
                f"{where} is being written by a run in progress (process {record['pid']}, {since}); "
                "wait for it to end, or choose another directory"
            )
        if record.get("files") is None or unlisted:
            what = (
                f"files it did not record ({_shown(unlisted)})"
                if record.get("files") is not None
                else "did not record its files"
            )
            raise ConfigError(
                f"{where} holds a run that never finished (its {MARKER} says 'running' {since}: it was killed) and "
                f"{what}, so optiplug cannot tell them from yours and deletes none; resume it from one of its "
                f"checkpoints (training.resume_from_checkpoint), or {keep}"
            )
    elif unlisted:
        _refuse_foreign(where, unlisted)
    return record, [name for name in entries if name in listed]


def _shown(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _refuse_foreign(where: str, names: list[str]) -> None:
    raise ConfigError(
        f"{where} holds files optiplug did not write ({_shown(names)}); "
        "choose a new or empty directory (optiplug never deletes files it did not write)"
    )


def _continues_here(args: Any, out: Path) -> bool:
    resume = getattr(args, "resume_from_checkpoint", None)
    return resume is not None and _inside(Path(str(resume)), out)


def _inputs(config: Any) -> list[tuple[str, str]]:
    from optiplug.app.config import EMBEDDED

    inputs = [("model.name_or_path", config.model.name_or_path), ("model.tokenizer", config.model.tokenizer)]
    for key in ("path", "eval_path"):
        value = getattr(config.data, key, None) or []
        inputs += [(f"data.{key}", path) for path in ([value] if isinstance(value, str) else value)]
    return [(field_name, name) for field_name, name in inputs if name and name != EMBEDDED]


def check_output_dir(config: Any, args: Any) -> None:
    """Apply the output-directory rule and check the directory can be written; writes nothing that stays.

    Raises:
        ConfigError: with one line that says what to do.
    """
    out = Path(args.output_dir).expanduser()
    for field_name, name in _inputs(config):
        path = Path(name).expanduser()
        if path.is_dir() and _inside(out, path):
            raise ConfigError(
                f"training.output_dir: {str(out)!r} is inside {field_name} {name!r}; a run never writes into its "
                "own input: choose another training.output_dir"
            )
        if path.exists() and out.exists() and _inside(path, out):
            raise ConfigError(
                f"{field_name}: {name!r} is inside training.output_dir {str(out)!r}, which the run writes "
                "(and an overwrite empties): copy it out of there first, or choose another training.output_dir"
            )
    ancestor = out
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        if ancestor == out:
            raise ConfigError(f"training.output_dir: {str(out)!r} is a file; choose a directory")
        raise ConfigError(f"training.output_dir: {str(out)!r} is under the file {str(ancestor)!r}; choose a directory")
    # Only the main process judges the contents: another may look after the main one wrote its marker.
    main = getattr(args, "process_index", 0) == 0
    if main and ancestor == out and _entries(out) and not _continues_here(args, out):
        record, _ = _recorded_entries(out)
        if record is not None and not config.training.get(OVERWRITE, False):
            raise ConfigError(
                f"training.output_dir: {str(out)!r} holds an earlier optiplug run; set "
                f"training.{OVERWRITE}=true to replace it, or choose another directory"
            )
    try:
        handle, probe = tempfile.mkstemp(prefix=".optiplug-write-test-", dir=ancestor)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise ConfigError(
            f"training.output_dir: cannot write in {str(ancestor)!r} ({error.strerror or error}); "
            "choose a directory you can write"
        ) from None


@dataclass
class OutputDir:
    """The output directory of a run (see :func:`prepare_output_dir`): nothing on disk changes before :meth:`begin`.

    Attributes:
        path: the directory.
        main: whether this process writes (the main process of a distributed run).
        created: directories that did not exist when the run was planned, deepest first (removed again
            when the run ends without writing anything in them).
        replaced: an earlier run's entries, removed by :meth:`begin`.
        kept: entries an earlier run recorded that this run continues (a resume inside the directory).
    """

    path: Path
    main: bool
    created: list[Path] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    started: str = ""
    begun: bool = False
    _present: set[str] = field(default_factory=set)
    _expected: set[str] = field(default_factory=set)

    def begin(self, stale: Iterable[str] = ()) -> None:
        """Just before the first step, every check passed: remove the earlier run being replaced (and the
        ``stale`` entries of one being continued), create the directory, write the marker "running"."""
        if not self.main or self.begun:
            return
        for name in [*self.replaced, *stale]:
            path = self.path / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._present = set(_entries(self.path))
            self.begun = True
            self._write("running")
        except OSError as error:
            raise ConfigError(
                f"training.output_dir: cannot write in {str(self.path)!r} ({error.strerror or error}); "
                "choose a directory you can write"
            ) from None

    def files(self) -> list[str]:
        """What this run (and the earlier run it continues) wrote: never an entry that was there before it
        and that no marker listed."""
        ours = [name for name in _entries(self.path) if name in self.kept or name not in self._present]
        return sorted({MARKER, *ours, *self._expected} - {MARKER_TMP})

    def expect(self, names: Iterable[str]) -> None:
        """Record, before writing them, entries this run is about to write (the next ``checkpoint-N``): a run
        killed while writing one leaves it listed, hence removable, and a resumed run that writes it again owns it.
        Names expected before :meth:`begin` are in its first marker (what the run writes at its end).
        """
        if self.main:
            self._expected.update(names)
            self.record()

    def record(self) -> None:
        """Record the files written so far (after each checkpoint): a run killed later is judged by this list."""
        if self.main and self.begun:
            # on failure the next record or finish tries again; a killed run's older list only refuses more
            with contextlib.suppress(OSError):
                self._write("running")

    def finish(self, status: str, **details: Any) -> str | None:
        """Record how the run ended and what it wrote; a run that wrote nothing leaves no directory it created.

        Never raises (the run's own error must not be masked): returns why the marker could not be written.
        """
        if not self.main:
            return None
        if not self.begun or not self.path.is_dir():
            self._remove_created()
            return None
        try:
            self._expected = {name for name in self._expected if (self.path / name).exists()}
            if self.files() == [MARKER] and not self.kept and status != "finished":
                (self.path / MARKER).unlink(missing_ok=True)
                (self.path / MARKER_TMP).unlink(missing_ok=True)
                self._remove_created()
                return None
            self._write(status, **details)
        except OSError as error:
            return (
                f"could not record the run's files in {str(self.path / MARKER)!r} ({error.strerror or error}); "
                "optiplug will refuse to replace this directory: free some space, then move what you want to keep "
                "and delete it"
            )
        return None

    def _remove_created(self) -> None:
        for directory in self.created:  # deepest first
            try:
                directory.rmdir()
            except OSError:
                break

    def _write(self, status: str, **details: Any) -> None:
        record = {"status": status, "started": self.started, **details}
        if status == "running":
            record.update(pid=os.getpid(), host=socket.gethostname())
        write_marker(self.path, {**record, "files": self.files()})


def write_marker(out: Path, data: dict[str, Any]) -> None:
    """Replace the marker atomically; on a full disk, rewrite it in place (its own blocks are freed first).

    Leaves no ``.tmp`` file behind; a marker left torn by a failure here reads as corrupt, which refuses.
    """
    text = json.dumps(data, indent=2) + "\n"
    tmp, path = out / MARKER_TMP, out / MARKER
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        return
    except OSError:
        tmp.unlink(missing_ok=True)
        if not path.is_file():
            raise
    with open(path, "r+", encoding="utf-8") as handle:
        handle.truncate(0)
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def prepare_output_dir(config: Any, args: Any, main: bool) -> OutputDir:
    """The plan for the output directory once every check passed; changes nothing (:meth:`OutputDir.begin` does).

    Call :meth:`OutputDir.begin` right before the first step and :meth:`OutputDir.finish` when the run ends,
    however it ends.
    """
    out = Path(args.output_dir).expanduser()
    created = []
    probe = out
    while not probe.exists() and probe != probe.parent:
        created.append(probe)
        probe = probe.parent
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    handle = OutputDir(out, main, created, started=started)
    if main and out.is_dir() and _entries(out):
        if _continues_here(args, out):
            record, _ = read_marker(out)
            listed = set(record.get("files") or ()) if record else set()
            handle.kept = [name for name in _entries(out) if name in listed]
        else:
            handle.replaced = _recorded_entries(out)[1]  # checked again: refuses anything it did not record
    return handle


def last_checkpoint(out: Path, before: int | None = None) -> Path | None:
    """The ``checkpoint-N`` directory with the highest N (below ``before`` when given) that holds a trainer state."""
    best: tuple[int, Path] | None = None
    if not out.is_dir():
        return None
    for path in out.glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        if not step.isdigit() or not (path / "trainer_state.json").is_file():
            continue
        if before is not None and int(step) >= before:
            continue
        if best is None or int(step) > best[0]:
            best = (int(step), path)
    return best[1] if best else None


# ---- files that must be whole ------------------------------------------------------------------


def _safetensors_problem(path: Path) -> str | None:
    """Why a ``.safetensors`` file cannot be read (None: its header and size agree), from the header alone."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return "it is truncated (shorter than a safetensors header)"
            (length,) = struct.unpack("<Q", head)
            if length > size - 8:
                return "it is truncated (the header is cut off)"
            header = json.loads(handle.read(length))
    except OSError as error:
        return f"it cannot be read ({error.strerror or error})"
    except ValueError:
        return "its header is not valid safetensors JSON"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)]
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        return f"it is truncated ({size} of {expected} bytes)"
    return None


def check_weight_files(directory: Path, field_name: str) -> None:
    """Refuse a directory whose ``*.safetensors`` files are truncated or corrupt (header check only)."""
    for path in sorted(directory.glob("*.safetensors")):
        problem = _safetensors_problem(path)
        if problem:
            raise CheckpointError(
                f"{field_name}: {str(path)!r} cannot be loaded: {problem}; copy or save the file again"
            )


def _torch_file_problem(path: Path) -> str | None:
    """Why a ``torch.save`` file cannot be read (None: a complete zip archive)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile):
        return "it is truncated or not a torch.save file"
    return f"its entry {bad!r} is corrupt" if bad else None


def check_checkpoint(checkpoint: str, optimizer: Any, scheduler: Any, engine: bool) -> None:
    """A checkpoint to resume from: complete, whole, and saved with this run's optimizer and scheduler config.

    Args:
        checkpoint: the ``checkpoint-N`` directory.
        optimizer, scheduler: the run's configs.
        engine: DeepSpeed or FSDP (they store the optimizer state in their own layout: not checked here).

    Raises:
        CheckpointError: a missing optimizer state, a truncated file, a missing or unreadable
            :data:`CHECKPOINT_RECORD`, or a config that differs.
    """
    path = Path(checkpoint)
    field_name = "training.resume_from_checkpoint"
    if not engine:
        states = [p for p in path.iterdir() if p.name.endswith(("optimizer.pt", "optimizer.bin"))]
        if not states:
            raise CheckpointError(
                f"{field_name}: {checkpoint!r} has no optimizer.pt, so the optimizer's state would start afresh; "
                f"give a complete checkpoint, or start a new run from its weights (model.name_or_path={checkpoint})"
            )
        for state in sorted(path.glob("*.pt")) + sorted(path.glob("*.pth")):
            problem = _torch_file_problem(state)
            if problem:
                raise CheckpointError(
                    f"{field_name}: {str(state)!r} cannot be loaded: {problem}; resume from another checkpoint"
                )
    check_weight_files(path, field_name)
    record = _checkpoint_record(path, checkpoint, field_name)
    for kind, config in (("optimizer", optimizer), ("scheduler", scheduler)):
        saved, now = record.get(kind) or {}, config.model_dump(mode="json")
        if saved.get("name") != now.get("name"):
            raise CheckpointError(
                f"{field_name}: {checkpoint!r} was trained with {kind} {saved.get('name')!r}, this run selects "
                f"{now.get('name')!r}; resume with {kind}.name={saved.get('name')}, or start a new run"
            )
        saved = _as_read_now(saved, config)
        changed = [f"{kind}.{k}={now.get(k)!r} (checkpoint: {saved.get(k)!r})" for k in _differing(saved, now, config)]
        if changed:
            raise CheckpointError(
                f"{field_name}: {', '.join(changed)}: a resumed run continues the checkpoint's {kind} state; "
                f"drop the change, or start a new run (from its weights: model.name_or_path={checkpoint})"
            )


def _checkpoint_record(path: Path, checkpoint: str, field_name: str) -> dict[str, Any]:
    """The checkpoint's :data:`CHECKPOINT_RECORD`. Without one (a plain Trainer's checkpoint, or another program's)
    nothing says which optimizer and schedule the state belongs to, and the Trainer would continue the
    checkpoint's own rates and optimizer settings whatever the run's sections say: refused, never guessed."""
    file = path / CHECKPOINT_RECORD
    if not file.is_file():
        raise CheckpointError(
            f"{field_name}: {checkpoint!r} has no {CHECKPOINT_RECORD} (it was not saved by optiplug train), so "
            "nothing says which optimizer and schedule it was trained with, and a resume would continue its own "
            "learning rates and optimizer settings whatever the optimizer and scheduler sections say; start a new "
            f"run from its weights (model.name_or_path={checkpoint})"
        )
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict):
        raise CheckpointError(
            f"{field_name}: {str(file)!r} cannot be read as optiplug's record of the checkpoint's optimizer and "
            f"scheduler; resume from another checkpoint, or start a new run from its weights "
            f"(model.name_or_path={checkpoint})"
        )
    return record


def _as_read_now(saved: dict[str, Any], config: Any) -> dict[str, Any]:
    """The checkpoint's record of a config as this version reads it: a field renamed since under its new name (adamw's
    ``implementation`` is ``kernel``). A record this version cannot read is compared as it was written."""
    try:
        return dict(type(config).model_validate(saved).model_dump(mode="json"))
    except ValueError:  # pydantic's ValidationError
        return saved


def _differing(saved: dict[str, Any], now: dict[str, Any], config: Any) -> Iterable[str]:
    """The fields that differ; one the checkpoint's record lacks (added to the config since) differs only
    when this run sets it to something other than its default, which is what the older run did."""
    fields = type(config).model_fields

    def added_at_default(key: str) -> bool:
        return key not in saved and key in fields and getattr(config, key) == fields[key].get_default()

    keys = sorted(set(saved) | set(now))
    return [k for k in keys if k != "name" and saved.get(k) != now.get(k) and not added_at_default(k)]
