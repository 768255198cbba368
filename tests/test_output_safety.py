"""Issue 19, class A and the marker parts of class D: nothing a user wrote or an earlier run produced is lost.

The rule: everything that can fail is checked before anything is removed; only files optiplug recorded
writing are removed; a marker that cannot be read, or that does not list its files, refuses (it never guesses).
Real `optiplug train` runs with tiny settings; a full disk is a save patched to raise ENOSPC.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import optiplug
from optiplug import CheckpointError, ConfigError
from optiplug.app import train
from optiplug.app.run import SUMMARY_FILE
from optiplug.app.safety import MARKER, MARKER_TMP
from optiplug.app.testing import run_cli

FAST = [
    "data.block_size=16",
    "data.max_blocks=32",
    "training.max_steps=4",
    "training.per_device_train_batch_size=4",
    "training.logging_steps=1",
    "training.disable_tqdm=true",
]
OVERWRITE = "training.overwrite_output_dir=true"


def last_line(err: str) -> str:
    return [line for line in err.splitlines() if line.startswith("optiplug: ")][-1]


def listing(directory: Path) -> dict[str, int]:
    """Every file under ``directory`` with its size: what must not change."""
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished run with two checkpoints (read-only for the tests: each copies it)."""
    out = tmp_path_factory.mktemp("finished") / "out"
    train(overrides=[*FAST, "training.save_steps=2", f"training.output_dir={out}"], quiet=True)
    assert (out / "checkpoint-2" / "trainer_state.json").is_file() and (out / "checkpoint-4").is_dir()
    return out


@pytest.fixture
def earlier(finished, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    return out


def test_a_model_inside_the_output_directory_is_refused_and_kept(earlier):
    """The resume refusal's own advice (model.name_or_path=out/checkpoint-2) with an overwrite of out."""
    before = listing(earlier)
    checkpoint = earlier / "checkpoint-2"
    code, _, err = run_cli("train", *FAST, f"model.name_or_path={checkpoint}", f"training.output_dir={earlier}",
                           OVERWRITE)  # fmt: skip
    assert code == 1 and err == (
        f"optiplug: model.name_or_path: '{checkpoint}' is inside training.output_dir '{earlier}', which the run "
        "writes (and an overwrite empties): copy it out of there first, or choose another training.output_dir\n"
    )
    assert listing(earlier) == before


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.report_to=wandb", None),  # found by the Trainer's constructor
        ("optimizer.param_groups=[{match: embed, momentum: 0.5}]", "takes no per-group option 'momentum'"),
    ],
)
def test_a_mistake_found_after_the_checks_deletes_nothing(earlier, override, message):
    before = listing(earlier)
    code, _, err = run_cli("train", *FAST, override, f"training.output_dir={earlier}", OVERWRITE)
    assert code == 1 and (message is None or message in last_line(err))
    assert listing(earlier) == before  # the earlier run, marker included, is as it was


class _Callback:
    def __init__(self, on_step_end, event: str = "on_step_end"):
        self.work, self.event = on_step_end, event

    @optiplug.hookimpl
    def trainer_callbacks(self, trainer, config):
        from transformers import TrainerCallback

        work = self.work
        callback = type("Do", (TrainerCallback,), {self.event: lambda self, args, state, control, **kw: work(state)})
        return [callback()]


def _train_in_a_child(overrides: list[str], before=None) -> int:
    """``optiplug.app.train`` in a forked process (``before()`` first); its exit code (negative: the signal)."""

    def target() -> None:
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # not the test worker's pipes
            os.dup2(devnull, fd)
        if before is not None:
            before()
        train(overrides=overrides, quiet=True)

    child = multiprocessing.get_context("fork").Process(target=target)
    child.start()
    child.join(300)
    return child.exitcode if child.exitcode is not None else 0


def test_a_killed_run_refuses_an_overwrite_and_keeps_the_users_file(tmp_path, temp_plugin):
    """kill -9 after the checkpoint at step 2: the marker lists what was there; the user's README.md is not."""

    test = os.getpid()

    def kill(state):
        if state.global_step == 3 and os.getpid() != test:  # the child only: this test resumes the run itself
            os.kill(os.getpid(), signal.SIGKILL)

    temp_plugin(_Callback(kill), "kill-9")
    out = tmp_path / "out"
    assert _train_in_a_child([*FAST, "training.save_steps=2", f"training.output_dir={out}"]) == -signal.SIGKILL
    record = json.loads((out / MARKER).read_text())
    assert record["status"] == "running" and "checkpoint-2" in record["files"]
    assert {p.name for p in out.iterdir()} <= set(record["files"])  # it recorded all it wrote
    (out / "README.md").write_text("my notes")
    before = listing(out)
    code, _, err = run_cli("train", *FAST, f"training.output_dir={out}", OVERWRITE)
    assert code == 1 and err == (
        f"optiplug: training.output_dir: '{out}' holds a run that never finished (its {MARKER} says 'running' "
        f"since {record['started']}: it was killed) and files it did not record (README.md), so optiplug cannot "
        "tell them from yours and deletes none; resume it from one of its checkpoints "
        "(training.resume_from_checkpoint), or move what you want to keep out of it and delete it, "
        "or choose another directory\n"
    )
    assert listing(out) == before
    # continuing it there keeps the user's file out of the run's record
    code, _, err = run_cli("train", *FAST, f"training.output_dir={out}",
                           f"training.resume_from_checkpoint={out / 'checkpoint-2'}")  # fmt: skip
    assert code == 0, err
    record = json.loads((out / MARKER).read_text())
    assert record["status"] == "finished" and "checkpoint-2" in record["files"] and "README.md" not in record["files"]
    assert (out / "README.md").read_text() == "my notes"


def test_a_run_killed_while_saving_a_checkpoint_recorded_it_first(tmp_path):
    """kill -9 in the middle of writing checkpoint-2 (its optimizer state): the marker named checkpoint-2 before
    it was written, so the half-written checkpoint is the run's, and an overwrite removes it."""

    def killed_while_saving() -> None:
        real = torch.save

        def save(obj, f, *args, **kwargs):
            if "checkpoint-2" in str(f):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(obj, f, *args, **kwargs)

        torch.save = save

    out = tmp_path / "out"
    code = _train_in_a_child([*FAST, "training.save_steps=2", f"training.output_dir={out}"], killed_while_saving)
    assert code == -signal.SIGKILL
    record = json.loads((out / MARKER).read_text())
    assert record["status"] == "running" and "checkpoint-2" in record["files"]
    assert {p.name for p in out.iterdir()} <= set(record["files"])  # the half-written checkpoint included
    assert not (out / "checkpoint-2" / "trainer_state.json").exists()
    train(overrides=[*FAST, "training.max_steps=2", f"training.output_dir={out}", OVERWRITE], quiet=True)
    record = json.loads((out / MARKER).read_text())
    assert record["status"] == "finished" and not any(name.startswith(("checkpoint-", ".")) for name in record["files"])
    assert {p.name for p in out.iterdir()} == set(record["files"])  # the killed run's entries are gone


def _kill_in_the_final_model_save(out: Path) -> None:
    """kill -9 while the Trainer's final ``save_model`` writes (its arguments come after the weights)."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if str(f).endswith("training_args.bin") and "checkpoint-" not in str(f):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(obj, f, *args, **kwargs)

    torch.save = save


def _kill_after_the_model_is_in_place(out: Path) -> None:
    """kill -9 while ``trainer_state.json`` is written beside the final model."""
    from transformers import TrainerState

    real = TrainerState.save_to_json

    def save_to_json(self, json_path):
        if Path(json_path) == out / "trainer_state.json":
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, json_path)

    TrainerState.save_to_json = save_to_json


@pytest.mark.parametrize("kill", [_kill_in_the_final_model_save, _kill_after_the_model_is_in_place])
def test_a_run_killed_while_writing_its_final_model_can_be_overwritten(tmp_path, kill):
    """kill -9 at the end of a run: every entry it wrote was named in its marker before it appeared (the model is
    staged like a checkpoint), so an overwrite removes them instead of refusing them as files nobody recorded."""
    out = tmp_path / "out"
    code = _train_in_a_child([*FAST, "training.save_steps=2", f"training.output_dir={out}"], lambda: kill(out))
    assert code == -signal.SIGKILL
    record = json.loads((out / MARKER).read_text())
    assert record["status"] == "running"
    assert {p.name for p in out.iterdir()} <= set(record["files"])  # nothing it wrote is unlisted
    assert not (out / SUMMARY_FILE).exists()
    (out / "README.md").write_text("my notes")  # the user's, written after the kill: never the run's
    code, _, err = run_cli("train", *FAST, "training.max_steps=2", f"training.output_dir={out}", OVERWRITE)
    assert code == 1 and "README.md" in last_line(err), err  # refused for the user's file, nothing removed
    assert (out / "README.md").read_text() == "my notes" and (out / "checkpoint-4").is_dir()
    (out / "README.md").unlink()
    code, _, err = run_cli("train", *FAST, "training.max_steps=2", f"training.output_dir={out}", OVERWRITE)
    assert code == 0, err
    record = json.loads((out / MARKER).read_text())
    assert record["status"] == "finished" and {p.name for p in out.iterdir()} == set(record["files"])
    assert not (out / "checkpoint-4").exists() and json.loads((out / SUMMARY_FILE).read_text())["steps"] == 2


def test_a_marker_without_a_list_of_files_refuses(earlier):
    """What an older optiplug left when killed: "running" and no file list; no pattern guesses which are its."""
    (earlier / MARKER).write_text(json.dumps({"status": "running", "started": "2026-01-01T00:00:00+00:00"}))
    (earlier / "README.md").write_text("my notes")
    before = listing(earlier)
    code, _, err = run_cli("train", *FAST, f"training.output_dir={earlier}", OVERWRITE)
    assert code == 1 and "and did not record its files, so optiplug cannot tell them from yours" in err
    assert listing(earlier) == before


def test_a_run_in_progress_is_refused(earlier):
    record = json.loads((earlier / MARKER).read_text())
    record.update(status="running", pid=os.getppid(), host=os.uname().nodename)
    (earlier / MARKER).write_text(json.dumps(record))
    code, _, err = run_cli("train", *FAST, f"training.output_dir={earlier}", OVERWRITE)
    assert code == 1 and err.startswith(
        f"optiplug: training.output_dir: '{earlier}' is being written by a run in progress (process {os.getppid()}, "
    )


@pytest.mark.parametrize(("content", "why"), [("", "it is empty"), ('{"status": "fini', "it is cut off or not JSON")])
def test_a_corrupt_marker_says_so_and_what_to_do(earlier, content, why):
    (earlier / MARKER).write_text(content)
    before = listing(earlier)
    code, _, err = run_cli("train", *FAST, f"training.output_dir={earlier}", OVERWRITE)
    assert code == 1 and err == (
        f"optiplug: training.output_dir: '{earlier}' holds an optiplug run whose {MARKER} is corrupt ({why}), so "
        "optiplug cannot tell its files from yours and deletes none; move what you want to keep out of it and "
        "delete it, or choose another directory\n"
    )
    assert listing(earlier) == before


def test_a_full_disk_reports_the_real_error_and_leaves_no_running_marker(tmp_path, monkeypatch):
    """The checkpoint save fails with ENOSPC; so does the marker's temporary file: the save's error is the one
    reported, the marker says "failed" (rewritten in place), and no optiplug_run.json.tmp is left."""
    import optiplug.app.safety as safety

    full = []
    real_save = torch.save

    def no_space(obj, f, *args, **kwargs):
        if "checkpoint-4" not in str(f):  # checkpoint-2 is saved: the run has files the marker must list
            return real_save(obj, f, *args, **kwargs)
        full.append(True)
        raise OSError(errno.ENOSPC, "No space left on device", "optimizer.pt")

    real_open = open

    def full_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if full and Path(file).name == MARKER_TMP and "w" in mode:
            handle.close()  # the file is created, nothing can be written into it
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return handle

    monkeypatch.setattr(torch, "save", no_space)
    monkeypatch.setattr(safety, "open", full_open, raising=False)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"could not save checkpoint-4 .*No space left on device") as info:
        train(overrides=[*FAST, "training.save_steps=2", f"training.output_dir={out}"], quiet=True)
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.filename == "optimizer.pt"
    assert json.loads((out / MARKER).read_text())["status"] == "failed"
    assert not (out / MARKER_TMP).exists() and not (out / "checkpoint-4").exists()


def test_a_leftover_temporary_marker_is_the_runs_own(earlier):
    (earlier / MARKER_TMP).write_bytes(b"")  # what a kill during the marker's rewrite leaves
    train(overrides=[*FAST, "training.max_steps=2", f"training.output_dir={earlier}", OVERWRITE], quiet=True)
    assert json.loads((earlier / SUMMARY_FILE).read_text())["steps"] == 2
    assert not (earlier / MARKER_TMP).exists() and not (earlier / "checkpoint-4").exists()
    # killed while writing its very first marker: the directory holds nothing else, so it is as good as empty
    first = earlier.parent / "first"
    first.mkdir()
    (first / MARKER_TMP).write_bytes(b"")
    train(overrides=[*FAST, "training.max_steps=1", f"training.output_dir={first}"], quiet=True)
    assert sorted(p.name for p in first.iterdir()) == sorted(json.loads((first / MARKER).read_text())["files"])


def test_a_marker_that_cannot_be_written_at_the_end_of_a_finished_run_is_an_error(tmp_path, monkeypatch):
    import optiplug.app.safety as safety

    real = safety.write_marker

    def fail_at_the_end(out, data):
        if data["status"] != "running":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(out, data)

    monkeypatch.setattr(safety, "write_marker", fail_at_the_end)
    out = tmp_path / "out"
    with pytest.raises(optiplug.OptiplugError) as info:
        train(overrides=[*FAST, "training.max_steps=2", f"training.output_dir={out}"], quiet=True)
    assert str(info.value) == (
        f"the run finished, but optiplug could not record the run's files in '{out / MARKER}' (No space left on "
        "device); optiplug will refuse to replace this directory: free some space, then move what you want to "
        "keep and delete it"
    )
    assert (out / SUMMARY_FILE).is_file()


def test_the_input_rule_holds_both_ways(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"is inside model\.name_or_path"):
        train(overrides=[*FAST, f"model.name_or_path={model}", f"training.output_dir={model / 'run'}"])
    with pytest.raises(ConfigError, match=r"is inside training\.output_dir"):
        train(overrides=[*FAST, f"model.name_or_path={model}", f"training.output_dir={tmp_path}", OVERWRITE])


@pytest.mark.slow
def test_the_readme_commands_in_order_the_suite_ignores_the_runs_output(tmp_path):
    """README command 1 (`optiplug train`: outputs/optiplug-run in the working directory; tiny here), then the
    suite from the same directory: the two tests that refused "holds an earlier optiplug run" must pass (every
    test runs in an empty working directory of its own: the root conftest.py)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    train = [sys.executable, "-m", "optiplug", "train", *FAST, "training.max_steps=1", "--quiet"]
    done = subprocess.run(train, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "outputs" / "optiplug-run" / MARKER).read_text())["status"] == "finished"
    tests = Path(__file__).resolve().parent
    suite = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
        f"{tests / 'test_cli.py'}::test_validate_ok_and_errors",
        f"{tests / 'test_groups_and_schedule_cli.py'}::"
        "test_validate_groups_prints_the_same_table_and_refuses_a_pattern_that_matches_nothing",
    ]  # fmt: skip
    done = subprocess.run(suite, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "2 passed" in done.stdout, done.stdout[-3000:]
