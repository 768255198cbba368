"""``optiplug compare``: child processes, their peak memory, failures, and the written comparison."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import optiplug
from optiplug import ConfigError
from optiplug.app.compare import CompareRun, ProcessResult, compare, read_run, run_process

PY = sys.executable


# ---- the child-process runner ---------------------------------------------------------------


def test_run_process_measures_the_childs_own_peak_memory(tmp_path):
    touch = "b = bytearray({} * 2**20); b[::4096] = b'x' * len(b[::4096]); import time; time.sleep(0.3)"
    small = run_process([PY, "-c", touch.format(1)], tmp_path / "small.log")
    big = run_process([PY, "-c", touch.format(300)], tmp_path / "big.log")
    assert small.returncode == big.returncode == 0
    assert big.peak_rss_bytes - small.peak_rss_bytes >= 290 * 2**20
    assert small.peak_rss_bytes < 40 * 2**20  # its own, not this (larger) pytest process's


def test_peak_memory_is_the_childs_own_under_a_large_parent(tmp_path):
    # ru_maxrss alone would report the parent's 400 MiB for a child that never uses it
    code = (
        "import sys; sys.path[:0] = {path!r}; from optiplug.app.compare import run_process\n"
        "big = bytearray(400 * 2**20); big[::4096] = b'x' * len(big[::4096])\n"
        "r = run_process([sys.executable, '-c', 'import time; time.sleep(0.3)'], {log!r})\n"
        "print(r.peak_rss_bytes)"
    ).format(path=sys.path, log=str(tmp_path / "child.log"))
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out) < 40 * 2**20


def test_error_line_is_the_optiplug_line_or_the_last_line(tmp_path):
    code = "import sys; print('working'); print('optiplug: optimizer.rank: bad', file=sys.stderr); print('bye'); sys.exit(1)"
    result = run_process([PY, "-c", code], tmp_path / "a.log")
    assert (result.returncode, result.error_line()) == (1, "optimizer.rank: bad")
    crash = run_process([PY, "-c", "raise RuntimeError('out of cheese')"], tmp_path / "b.log")
    assert (crash.returncode, crash.error_line()) == (1, "RuntimeError: out of cheese")
    silent = run_process([PY, "-c", "import sys; sys.exit(3)"], tmp_path / "c.log")
    assert silent.error_line() == "exited with status 3 and no output"


@pytest.mark.parametrize("compare_sigint", [signal.default_int_handler, signal.SIG_IGN])
def test_a_process_past_its_timeout_is_stopped_and_reported_as_a_timeout(tmp_path, compare_sigint):
    """SIGINT first (an optiplug run records that it was interrupted, at which step), the word timeout and the
    limit in the error, never "exited with status -9" or the progress bar's last fragment. Also when compare was
    started with SIGINT ignored (``nohup optiplug compare ... &``): its runs still take the SIGINT."""
    previous = signal.signal(signal.SIGINT, compare_sigint)
    try:
        _past_its_timeout(tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)


def _past_its_timeout(tmp_path) -> None:
    code = (
        "import sys, time\n"
        "print('  3/400 [00:01<02:10, 3.1it/s]', end='\\r', flush=True)\n"
        "try:\n    time.sleep(60)\n"
        "except KeyboardInterrupt:\n"
        "    print('optiplug: interrupted at step 3; no complete checkpoint was saved', file=sys.stderr)\n"
        "    sys.exit(130)\n"
    )
    result = run_process([PY, "-c", code], tmp_path / "t.log", timeout=2)
    assert result.returncode == 130 and result.timed_out == 2
    assert (
        result.error_line() == "timeout: stopped at step 3 after the --timeout of 2 s; raise --timeout or lower --steps"
    )


def test_a_process_that_ignores_the_interrupt_is_killed(tmp_path, monkeypatch):
    from optiplug.app import compare

    monkeypatch.setattr(compare, "STOP_GRACE_SECONDS", 0.5)
    code = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('0/9', flush=True); time.sleep(60)"
    result = run_process([PY, "-c", code], tmp_path / "t.log", timeout=1)
    assert result.returncode == -9 and result.timed_out == 1
    assert result.error_line() == "timeout: stopped after the --timeout of 1 s; raise --timeout or lower --steps"


def _fake_runs(monkeypatch, written: list[Path]):
    """run_process that trains nothing: it writes the log and an empty run folder, as a failed run leaves them."""
    from optiplug.app import compare

    def fake_run_process(cmd, log, env=None, timeout=None, poll=None):
        Path(log).write_text("optiplug: no training here\n")
        written.append(Path(log))
        return ProcessResult(1, 0.1, None, Path(log))

    monkeypatch.setattr(compare, "run_process", fake_run_process)


def test_compare_never_overwrites_the_users_files_in_output(tmp_path, monkeypatch):
    written: list[Path] = []
    _fake_runs(monkeypatch, written)
    proj = tmp_path / "proj"
    (proj / "adamw").mkdir(parents=True)
    (proj / "adamw" / "notes.txt").write_text("mine")
    (proj / "compare.json").write_text('{"mine": true}')
    with pytest.raises(ConfigError) as info:
        compare(None, ["adamw", "sgd"], 2, proj, progress=False)
    assert str(info.value) == (
        f"--output: '{proj}' holds files optiplug compare did not write (adamw, compare.json); choose a new or "
        "empty folder (optiplug never overwrites files it did not write)"
    )
    assert written == [] and sorted(p.name for p in proj.rglob("*")) == ["adamw", "compare.json", "notes.txt"]
    assert (proj / "compare.json").read_text() == '{"mine": true}'


def test_a_rerun_into_an_earlier_compare_replaces_its_files_only(tmp_path, monkeypatch):
    written: list[Path] = []
    _fake_runs(monkeypatch, written)
    out = tmp_path / "cmp"
    runs = compare(None, ["adamw", "sgd"], 2, out, progress=False)
    assert [run.log for run in runs] == [str((out / "adamw.log").resolve()), str((out / "sgd.log").resolve())]
    assert json.loads((out / "optiplug_run.json").read_text())["status"] == "finished"
    compare(None, ["sgd"], 2, out, progress=False)  # an earlier compare's folder: allowed
    (out / "mine.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"did not write \(mine\.txt\)"):
        compare(None, ["sgd"], 2, out, progress=False)
    (out / "mine.txt").unlink()
    (out / "optiplug_run.json").write_text('{"status": "finished", "fi')
    with pytest.raises(ConfigError, match="is corrupt"):
        compare(None, ["sgd"], 2, out, progress=False)


def test_compare_into_a_training_run_is_refused(tmp_path):
    from optiplug.app.safety import write_marker

    write_marker(tmp_path, {"status": "finished", "files": ["optiplug_run.json"]})
    with pytest.raises(ConfigError) as info:
        compare(None, ["sgd"], 2, tmp_path, progress=False)
    assert (
        str(info.value)
        == f"--output: '{tmp_path}' holds an optiplug training run, not a compare; choose a new or empty folder"
    )


# ---- reading a run back ---------------------------------------------------------------------


def _trained_output(tmp_path: Path) -> Path:
    from optiplug.testing import TokenBlocks, tiny_llama, training_args

    trainer = optiplug.OptiTrainer(
        model=tiny_llama(), args=training_args(tmp_path, max_steps=3), train_dataset=TokenBlocks(n=12), optimizer="sgd"
    )
    trainer.train()
    trainer.state.save_to_json(str(tmp_path / "trainer_state.json"))
    return tmp_path


def test_read_run_takes_losses_and_speed_from_the_trainer_state(tmp_path):
    out = _trained_output(tmp_path)
    (out / "summary.json").write_text(json.dumps({"tokens_per_second": 1234.5, "optimizer_state_bytes": 4096}))
    run = read_run("sgd", out, ProcessResult(0, 2.5, 200 * 2**20, out / "compare.log"))
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [[h["step"], h["loss"]] for h in state["log_history"] if "loss" in h]
    assert run.ok and run.error is None
    assert run.losses == losses and [step for step, _ in losses] == [1, 2, 3]
    rates = [[h["step"], h["learning_rate"]] for h in state["log_history"] if "loss" in h]
    assert run.learning_rates == rates and len(rates) == 3
    assert run.final_loss == losses[-1][1]
    assert run.steps_per_second == state["log_history"][-1]["train_steps_per_second"]
    assert (run.tokens_per_second, run.optimizer_state_bytes, run.peak_rss_bytes) == (1234.5, 4096, 200 * 2**20)


def test_read_run_of_a_failed_process_keeps_its_error_line(tmp_path):
    log = tmp_path / "compare.log"
    log.write_text("Traceback (most recent call last):\n  ...\noptiplug: optimizer 'x' needs CUDA\n")
    run = read_run("x", tmp_path, ProcessResult(1, 1.0, 10, log))
    assert (run.ok, run.error, run.losses) == (False, "optimizer 'x' needs CUDA", [])


# ---- arguments are checked before anything runs ---------------------------------------------


@pytest.mark.parametrize(
    ("optimizers", "steps", "message"),
    [
        ([], 5, "compare needs at least one optimizer, e.g. --optimizers adamw,sgd"),
        (["sgd", "adamw", "sgd"], 5, "--optimizers: sgd given more than once"),
        (["sgd"], 0, "--steps: expected a positive number of steps, got 0"),
    ],
)
def test_bad_arguments(optimizers, steps, message, tmp_path):
    with pytest.raises(optiplug.ConfigError) as info:
        compare(None, optimizers, steps, tmp_path, progress=False)
    assert str(info.value) == message
    assert list(tmp_path.iterdir()) == []


def test_unknown_optimizer_fails_before_any_run(tmp_path):
    with pytest.raises(optiplug.UnknownNameError) as info:
        compare(None, ["adamw", "adamww"], 5, tmp_path / "out", progress=False)
    assert str(info.value).splitlines()[0] == "unknown optimizer 'adamww'. Did you mean 'adamw' or 'adam' or 'radam'?"
    assert not (tmp_path / "out").exists()


def test_missing_config_file(tmp_path):
    with pytest.raises(optiplug.ConfigError) as info:
        compare(tmp_path / "nope.yaml", ["sgd"], 5, tmp_path / "out", progress=False)
    assert str(info.value) == f"config file {str(tmp_path / 'nope.yaml')!r} does not exist"


# ---- end to end: real `python -m optiplug train` runs ---------------------------------------


@pytest.mark.slow
def test_compare_runs_each_optimizer_and_reports_the_failed_one(tmp_path):
    # optimizer.amsgrad is a field of adamw and adam but not of sgd: the sgd run fails, the others complete
    config = tmp_path / "run.yaml"
    config.write_text("data:\n  block_size: 32\n  max_blocks: 64\ntraining:\n  per_device_train_batch_size: 4\n")
    out = tmp_path / "cmp"
    result = subprocess.run(
        [PY, "-m", "optiplug", "compare", str(config), "optimizer.amsgrad=false", "--optimizers", "adamw,sgd,adam",
         "--steps", "4", "--output", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.strip().splitlines()[-1] == "optiplug: 1 of 3 runs failed (sgd); see the errors above"
    data = json.loads((out / "compare.json").read_text())
    runs = {run["optimizer"]: CompareRun(**run) for run in data["runs"]}
    assert list(runs) == ["adamw", "sgd", "adam"]
    assert runs["sgd"].ok is False
    assert (
        runs["sgd"].error
        == "optimizer.amsgrad: unknown field; check the spelling (`optiplug show NAME` lists the fields)"
    )
    assert "sgd failed: optimizer.amsgrad: unknown field" in result.stdout
    for name in ("adamw", "adam"):
        run = runs[name]
        assert run.ok, run.error
        assert [step for step, _ in run.losses] == [1, 2, 3, 4]
        assert run.steps_per_second > 0 and run.tokens_per_second > 0
        assert run.optimizer_state_bytes > 0 and run.peak_rss_bytes > 100 * 2**20
        assert name in result.stdout
    # same seed, data and schedule, and adam and adamw coincide without weight decay: identical curves
    assert runs["adamw"].losses == runs["adam"].losses
    assert runs["adamw"].optimizer_state_bytes == runs["adam"].optimizer_state_bytes
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_a_config_no_run_can_use_fails_before_anything_is_written(tmp_path):
    out = tmp_path / "cmp"
    result = subprocess.run(
        [PY, "-m", "optiplug", "compare", "optimizer.lr=abc", "--optimizers", "adamw,sgd", "--steps", "2",
         "--output", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("optiplug: optimizer.lr: Input should be a valid number")
    assert not out.exists()


def test_output_that_is_a_file_is_refused(tmp_path):
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    result = subprocess.run(
        [PY, "-m", "optiplug", "compare", "--optimizers", "adamw", "--steps", "2", "--output", str(afile)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip() == f"optiplug: --output: '{afile}' is a file; choose a directory"


def test_the_chart_has_a_learning_rate_panel(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from optiplug.app.compare import plot

    shown = {}
    monkeypatch.setattr(plt, "close", lambda fig: shown.setdefault("fig", fig))
    runs = [
        CompareRun("adamw", True, losses=[[1, 5.0], [2, 4.0]], learning_rates=[[1, 0.0], [2, 1e-3]]),
        CompareRun("sgd", True, losses=[[1, 5.0], [2, 4.5]], learning_rates=[[1, 0.0], [2, 5e-2]]),
    ]
    plot(runs, tmp_path / "compare.png", title="t")
    assert (tmp_path / "compare.png").read_bytes().startswith(b"\x89PNG")
    axes = shown["fig"].axes
    assert [a.get_title() for a in axes] == ["loss", "learning rate", "optimizer state (MiB)", "peak RSS (MiB)"]
    assert [list(line.get_ydata()) for line in axes[1].get_lines()] == [[0.0, 1e-3], [0.0, 5e-2]]
