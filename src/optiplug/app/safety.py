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

import datetime
import fnmatch
import json
import os
import shutil
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
    "OVERWRITE",
    "DivergedError",
    "OutputDir",
    "check_checkpoint",
    "check_output_dir",
    "check_weight_files",
    "last_checkpoint",
    "prepare_output_dir",
]

MARKER = "optiplug_run.json"
"""Written into the output directory when a run starts; lists what the run wrote when it ends."""
CHECKPOINT_RECORD = "optiplug_config.json"
"""Written into every ``checkpoint-N``: the optimizer and scheduler config the checkpoint was trained with."""
OVERWRITE = "overwrite_output_dir"
"""The ``training`` key (optiplug's, not a TrainingArguments field) that allows replacing an earlier run."""

# What a run writes, for a marker without its list of entries (the run was killed before it could write it).
_RUN_ENTRIES = (
    MARKER, "summary.json", "summary.json.tmp", "loss.png", "trainer_state.json", "training_args.bin",
    "checkpoint-*", "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "pytorch_model*.bin", "tokenizer*", "special_tokens_map.json",
    "added_tokens.json", "chat_template.*", "vocab.*", "merges.txt", "spiece.model", "adapter_config.json",
    "adapter_model.*", "README.md", "base_model", "pissa_converted", "runs",
)  # fmt: skip
# Written next to a run by `optiplug compare` (the run's log, open while it trains): neither the run's nor foreign.
_BESIDE_THE_RUN = ("compare.log",)


def _entries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name not in _BESIDE_THE_RUN)


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


def _read_marker(out: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((out / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _earlier_entries(out: Path, record: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(entries an earlier run wrote, entries it did not) of an output directory holding a marker."""
    listed = record.get("files")
    ours: list[str] = []
    foreign: list[str] = []
    for name in _entries(out):
        if isinstance(listed, list):
            mine = name == MARKER or name in listed
        else:
            mine = any(fnmatch.fnmatch(name, pattern) for pattern in _RUN_ENTRIES)
        (ours if mine else foreign).append(name)
    return ours, foreign


def _continues_here(args: Any, out: Path) -> bool:
    resume = getattr(args, "resume_from_checkpoint", None)
    return resume is not None and _inside(Path(str(resume)), out)


def check_output_dir(config: Any, args: Any) -> None:
    """Apply the output-directory rule and check the directory can be written; writes nothing that stays.

    Raises:
        ConfigError: with one line that says what to do.
    """
    from optiplug.app.config import EMBEDDED

    out = Path(args.output_dir).expanduser()
    inputs = [("model.name_or_path", config.model.name_or_path), ("model.tokenizer", config.model.tokenizer)]
    for key in ("path", "eval_path"):
        value = getattr(config.data, key, None) or []
        inputs += [(f"data.{key}", path) for path in ([value] if isinstance(value, str) else value)]
    for field_name, name in inputs:
        if name and name != EMBEDDED and Path(name).expanduser().is_dir() and _inside(out, Path(name)):
            raise ConfigError(
                f"training.output_dir: {str(out)!r} is inside {field_name} {name!r}; a run never writes into its "
                "own input: choose another training.output_dir"
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
        record = _read_marker(out)
        if record is None:
            foreign = _entries(out)
        else:
            foreign = _earlier_entries(out, record)[1]
        if foreign:
            shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
            raise ConfigError(
                f"training.output_dir: {str(out)!r} holds files optiplug did not write ({shown}); "
                "choose a new or empty directory (optiplug never deletes files it did not write)"
            )
        if not config.training.get(OVERWRITE, False):
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
    """The output directory of a run in progress (see :func:`prepare_output_dir`)."""

    path: Path
    main: bool
    created: list[Path] = field(default_factory=list)
    started: str = ""

    def finish(self, status: str, **details: Any) -> None:
        """Record how the run ended and what it wrote; a run that wrote nothing leaves no directory it created."""
        if not self.main or not self.path.is_dir():
            return
        entries = [name for name in _entries(self.path) if name != MARKER]
        if not entries and status != "finished":
            (self.path / MARKER).unlink(missing_ok=True)
            for directory in self.created:  # deepest first
                try:
                    directory.rmdir()
                except OSError:
                    break
            return
        _write_marker(self.path, {"status": status, "started": self.started, **details, "files": [MARKER, *entries]})


def _write_marker(out: Path, data: dict[str, Any]) -> None:
    tmp = out / (MARKER + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / MARKER)


def prepare_output_dir(config: Any, args: Any, main: bool) -> OutputDir:
    """After every check passed: remove an earlier run being replaced, create the directory, write the marker.

    Only the main process changes anything. Call :meth:`OutputDir.finish` when the run ends, however it ends.
    """
    out = Path(args.output_dir).expanduser()
    created = []
    probe = out
    while not probe.exists() and probe != probe.parent:
        created.append(probe)
        probe = probe.parent
    handle = OutputDir(out, main, created, datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    if not main:
        return handle
    if out.is_dir() and not _continues_here(args, out):
        record = _read_marker(out)
        if record is not None:
            for name in _earlier_entries(out, record)[0]:
                path = out / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_marker(out, {"status": "running", "started": handle.started})
    except OSError as error:
        raise ConfigError(
            f"training.output_dir: cannot write in {str(out)!r} ({error.strerror or error}); "
            "choose a directory you can write"
        ) from None
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
        CheckpointError: a missing optimizer state, a truncated file, or a config that differs.
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
    try:
        record = json.loads((path / CHECKPOINT_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # saved by another program or an older optiplug: nothing to compare
    for kind, config in (("optimizer", optimizer), ("scheduler", scheduler)):
        saved, now = record.get(kind) or {}, config.model_dump(mode="json")
        if saved.get("name") != now.get("name"):
            raise CheckpointError(
                f"{field_name}: {checkpoint!r} was trained with {kind} {saved.get('name')!r}, this run selects "
                f"{now.get('name')!r}; resume with {kind}.name={saved.get('name')}, or start a new run"
            )
        changed = [f"{kind}.{k}={now.get(k)!r} (checkpoint: {saved.get(k)!r})" for k in _differing(saved, now, config)]
        if changed:
            raise CheckpointError(
                f"{field_name}: {', '.join(changed)}: a resumed run continues the checkpoint's {kind} state; "
                f"drop the change, or start a new run (from its weights: model.name_or_path={checkpoint})"
            )


def _differing(saved: dict[str, Any], now: dict[str, Any], config: Any) -> Iterable[str]:
    """The fields that differ; one the checkpoint's record lacks (added to the config since) differs only
    when this run sets it to something other than its default, which is what the older run did."""
    fields = type(config).model_fields

    def added_at_default(key: str) -> bool:
        return key not in saved and key in fields and getattr(config, key) == fields[key].get_default()

    keys = sorted(set(saved) | set(now))
    return [k for k in keys if k != "name" and saved.get(k) != now.get(k) and not added_at_default(k)]
