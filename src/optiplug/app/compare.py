"""``optiplug compare``: the same short training run with several optimizers, side by side.

Each optimizer trains in its own process (``python -m optiplug train CONFIG optimizer.name=X
training.max_steps=N training.output_dir=DIR/X``), one after the other so that they do not
compete for the CPU, with the same seed, data and schedule. Compare reads back each run's
``summary.json`` and ``trainer_state.json`` and writes a table to the terminal,
``DIR/compare.json`` and ``DIR/compare.png`` (the loss curves); each run's output is in ``DIR/NAME.log``.
``DIR`` must be new, empty or an earlier compare's (its ``optiplug_run.json`` lists what it wrote): a compare
never overwrites a file it did not write. The peak resident memory of
each run is the child process's own high-water mark (``wait4``'s ``ru_maxrss``), measured the
same way for every optimizer. A run that fails is reported with its error line; the others
still run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import typer

from optiplug.app.measure import high_water_mark_bytes, maxrss_bytes
from optiplug.app.safety import MARKER, MARKER_TMP, read_marker, write_marker
from optiplug.errors import ConfigError, OptiplugError
from optiplug.registry import get_entry

__all__ = ["CompareRun", "ProcessResult", "command", "compare", "run_process", "train_command"]


# ---- running a child process and measuring its peak memory ----------------------------------

COMPARE_FILES = ("compare.json", "compare.png")
"""What a compare writes into ``--output`` besides one folder and one ``NAME.log`` per optimizer."""
STOP_GRACE_SECONDS = 10.0
"""How long a process past its timeout has to stop after SIGINT before it is killed."""


@dataclass(frozen=True)
class ProcessResult:
    """How a child process ended.

    Attributes:
        returncode: its exit status (negative: killed by that signal).
        wall_seconds: wall time from start to exit.
        peak_rss_bytes: its peak resident set size (its own, not its children's); None where
            the platform cannot tell.
        log_path: the file holding its stdout and stderr.
    """

    returncode: int
    wall_seconds: float
    peak_rss_bytes: int | None
    log_path: Path
    timed_out: float | None = None

    def error_line(self) -> str:
        """The line that says why the process failed: the timeout that stopped it, else its last
        ``optiplug: ...`` line, else its last line."""
        try:
            lines = [line.strip() for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            lines = []
        # tqdm redraws with carriage returns; keep what was drawn last
        lines = [line.rsplit("\r", 1)[-1] for line in lines]
        if self.timed_out is not None:
            steps = [m.group(1) for line in lines if (m := re.search(r"interrupted at step (\d+)", line))]
            at = f" at step {steps[-1]}" if steps else ""
            return f"timeout: stopped{at} after the --timeout of {self.timed_out:g} s; raise --timeout or lower --steps"
        for line in reversed(lines):
            if line.startswith("optiplug: "):
                return line.removeprefix("optiplug: ")
        if lines:
            return lines[-1]
        return f"exited with status {self.returncode} and no output"


def _handle_sigint() -> None:
    """In the child, before it executes the run: SIGINT at its default, so that Python turns it into Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_process(
    cmd: Sequence[str],
    log_path: str | Path,
    *,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float | None = None,
    poll: Callable[[float], None] | None = None,
) -> ProcessResult:
    """Run ``cmd`` to completion with its output in ``log_path``, measuring wall time and peak RSS.

    The peak is the child's own. ``wait4``'s ``ru_maxrss`` alone is not: Linux carries the
    parent's resident size at spawn time across ``exec`` into the child's figure. So when that
    figure does not exceed this process's own peak, the child's ``VmHWM`` (sampled while it runs,
    every 50 ms) is used instead.

    Args:
        cmd: the command and its arguments.
        log_path: file receiving the process's stdout and stderr (created, with its folders).
        env: the environment (default: this process's).
        cwd: the working directory.
        timeout: seconds after which the process is stopped: SIGINT (an optiplug run stops like on Ctrl-C and
            records that it was interrupted), then SIGKILL after :data:`STOP_GRACE_SECONDS`.
            :attr:`ProcessResult.timed_out` then holds the limit.
        poll: called with the elapsed seconds while the process runs.
    """
    import resource

    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sampled: int | None = None
    stopped_at: float | None = None
    start = time.perf_counter()
    with open(log_path, "wb") as log:
        # A run past its timeout is stopped with SIGINT: it must not inherit SIGINT ignored, as it does when compare
        # itself was started with it ignored (`nohup`, `&` in a script), or it would only ever be killed.
        ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        proc = subprocess.Popen(
            list(cmd), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd,
            preexec_fn=_handle_sigint if ignored else None,
        )  # fmt: skip
        # read after the spawn: a vfork child's pages before exec count in this process's peak too
        inherited = maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF)) + 2**20
        try:
            while True:
                pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                hwm = high_water_mark_bytes(proc.pid)
                if hwm is not None:
                    sampled = max(sampled or 0, hwm)
                elapsed = time.perf_counter() - start
                if timeout is not None and elapsed > timeout:
                    if stopped_at is None:
                        stopped_at = elapsed
                        proc.send_signal(signal.SIGINT)
                    elif elapsed > stopped_at + STOP_GRACE_SECONDS:
                        proc.kill()
                if poll is not None:
                    poll(elapsed)
                time.sleep(0.05)
        except BaseException:  # interrupted: do not leave the child running
            proc.kill()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    reported = maxrss_bytes(rusage)
    peak = reported if reported > inherited else sampled
    return ProcessResult(proc.returncode, wall, peak, log_path, timeout if stopped_at is not None else None)


# ---- one training run per optimizer ---------------------------------------------------------


@dataclass
class CompareRun:
    """One optimizer's run: its figures, or why it failed.

    Attributes:
        optimizer: the optimizer name.
        ok: whether the run finished.
        error: the run's error line when it failed.
        final_loss: the last logged training loss.
        steps_per_second: optimizer steps per second of training (the Trainer's ``train_steps_per_second``).
        tokens_per_second: training tokens per second, when the run's summary says.
        optimizer_state_bytes: bytes of optimizer state at the end of training, when the summary says.
        peak_rss_bytes: the training process's peak resident memory.
        wall_seconds: the whole process's wall time (start-up included).
        output_dir: the run's output directory.
        log: the file holding the run's output (beside its directory: ``NAME.log``).
        losses: ``[step, loss]`` pairs of the logged training losses.
        learning_rates: ``[step, learning rate]`` pairs of the same log records (the rate of that step).
        final_eval_loss: the last evaluation loss, when the run has evaluation data.
        best_eval_loss: the lowest evaluation loss, likewise.
        eval_losses: ``[step, eval loss]`` pairs of every evaluation.
    """

    optimizer: str
    ok: bool
    error: str | None = None
    final_loss: float | None = None
    steps_per_second: float | None = None
    tokens_per_second: float | None = None
    optimizer_state_bytes: int | None = None
    peak_rss_bytes: int | None = None
    wall_seconds: float = 0.0
    output_dir: str = ""
    log: str = ""
    losses: list[list[float]] = field(default_factory=list)
    learning_rates: list[list[float]] = field(default_factory=list)
    final_eval_loss: float | None = None
    best_eval_loss: float | None = None
    eval_losses: list[list[float]] = field(default_factory=list)


def train_command(
    config: str | Path | None, optimizer: str, steps: int, output_dir: Path, overrides: Sequence[str] = ()
) -> list[str]:
    """The ``python -m optiplug train ...`` command line of one compare run.

    Compare logs every step (for the curves); the user's overrides come next, and the optimizer,
    step count and output directory last, so they always hold.
    """
    return [
        sys.executable, "-m", "optiplug", "train",
        *([str(config)] if config is not None else []),
        "training.logging_steps=1",
        *overrides,
        f"optimizer.name={optimizer}",
        f"training.max_steps={steps}",
        f"training.output_dir={output_dir}",
        "training.overwrite_output_dir=true",  # compare owns its run folders: a rerun replaces them
    ]  # fmt: skip


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _first(mapping: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if mapping.get(key) is not None:
            return mapping[key]
    return None


def read_run(optimizer: str, output_dir: Path, process: ProcessResult) -> CompareRun:
    """A :class:`CompareRun` from a finished process and the files it left in ``output_dir``."""
    run = CompareRun(
        optimizer=optimizer,
        ok=process.returncode == 0,
        peak_rss_bytes=process.peak_rss_bytes,
        wall_seconds=round(process.wall_seconds, 3),
        output_dir=str(output_dir),
        log=str(process.log_path),
    )
    if not run.ok:
        run.error = process.error_line()
        return run
    summary = _read_json(output_dir / "summary.json")
    state = _read_json(output_dir / "trainer_state.json")
    history = state.get("log_history") or summary.get("log_history") or []
    run.losses = [[h["step"], h["loss"]] for h in history if "loss" in h and "step" in h]
    run.learning_rates = [[h["step"], h["learning_rate"]] for h in history if "loss" in h and "learning_rate" in h]
    final: dict[str, Any] = next((h for h in reversed(history) if "train_steps_per_second" in h), {})
    run.final_loss = _first(summary, "final_loss")
    if run.final_loss is None and run.losses:
        run.final_loss = run.losses[-1][1]
    run.steps_per_second = _first(summary, "steps_per_second", "train_steps_per_second")
    if run.steps_per_second is None:
        run.steps_per_second = final.get("train_steps_per_second")
    run.tokens_per_second = _first(summary, "tokens_per_second", "train_tokens_per_second")
    run.optimizer_state_bytes = _first(summary, "optimizer_state_bytes")
    run.eval_losses = [[h["step"], h["eval_loss"]] for h in history if "eval_loss" in h and "step" in h]
    if run.eval_losses:
        run.final_eval_loss = _first(summary, "final_eval_loss") or run.eval_losses[-1][1]
        run.best_eval_loss = _first(summary, "best_eval_loss") or min(loss for _, loss in run.eval_losses)
    if not run.losses:
        run.ok, run.error = False, f"no training loss was logged in {output_dir / 'trainer_state.json'}"
    return run


def compare(
    config: str | Path | None,
    optimizers: Sequence[str],
    steps: int,
    output: str | Path,
    overrides: Sequence[str] = (),
    *,
    progress: bool = True,
    timeout: float | None = None,
) -> list[CompareRun]:
    """Train the same run with each optimizer, one process after another, and write the comparison.

    Args:
        config: a YAML run config, or None for the embedded default run.
        optimizers: registered optimizer names.
        steps: optimizer steps per run.
        output: the folder receiving one subfolder per optimizer, ``compare.json`` and ``compare.png``.
        overrides: ``"a.b=value"`` strings applied to every run.
        progress: show a progress display on the terminal.
        timeout: seconds after which a run is stopped and reported as failed.

    Returns:
        One :class:`CompareRun` per optimizer, in the order given.

    Raises:
        UnknownNameError: an optimizer is not registered (checked before anything runs).
        ConfigError: no optimizers, a repeated one, or ``steps`` < 1.
    """
    names = list(optimizers)
    if not names:
        raise ConfigError("compare needs at least one optimizer, e.g. --optimizers adamw,sgd")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"--optimizers: {', '.join(repeated)} given more than once")
    if steps < 1:
        raise ConfigError(f"--steps: expected a positive number of steps, got {steps}")
    if timeout is not None and not timeout > 0:
        raise ConfigError(f"--timeout: expected a positive number of seconds, got {timeout:g}")
    for name in names:
        get_entry(name)
    from optiplug.app.config import load_config

    # A config no run can use is one error before anything runs or is written; a field that only
    # some optimizers lack fails just those runs (reported with the others' results).
    problems = []
    for name in names:
        try:
            load_config(config, [*overrides, f"optimizer.name={name}", f"training.max_steps={steps}"])
        except ConfigError as error:
            problems.append(error)
    if problems and len(problems) == len(names):
        raise problems[0]
    output = Path(output)
    record = _output_record(output, names)
    try:
        output.mkdir(parents=True, exist_ok=True)
        write_marker(output, record)  # what this compare will write, before it writes any of it
    except OSError as error:
        raise ConfigError(f"--output: cannot write in {str(output)!r}: {error.strerror or error}") from None
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    runs: list[CompareRun] = []
    status = "failed"
    try:
        with _Progress(names, steps, enabled=progress) as display:
            for name in names:
                run_dir = (output / name).resolve()
                log = output.resolve() / f"{name}.log"  # beside the run's folder: that folder holds only the run
                display.start(name, log)
                cmd = train_command(config, name, steps, run_dir, overrides)
                process = run_process(cmd, log, env=env, timeout=timeout, poll=display.poll)
                run = read_run(name, run_dir, process)
                display.finish(run)
                runs.append(run)
        write_outputs(runs, output, config=config, steps=steps, overrides=overrides)
        status = "finished"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        with contextlib.suppress(OSError):  # the record of the start already lists every file
            write_marker(output, {**record, "status": status})
    return runs


def _output_record(output: Path, names: Sequence[str]) -> dict[str, Any]:
    """The marker of a compare into ``output``: refuses (one line, before anything runs) a folder that is not
    new, empty or an earlier compare's, or that holds anything the earlier compare did not record writing.
    The runs' own folders are judged by their runs (``training.output_dir``'s rule)."""
    import datetime

    where = f"--output: {str(output)!r}"
    if output.exists() and not output.is_dir():
        raise ConfigError(f"{where} is a file; choose a directory")
    listed: list[str] = []
    entries = sorted(p.name for p in output.iterdir()) if output.is_dir() else []
    if entries:
        record, problem = read_marker(output)
        if problem:
            raise ConfigError(
                f"{where} holds an optiplug compare whose {MARKER} is corrupt ({problem}), so optiplug cannot tell "
                "its files from yours and overwrites none; choose a new or empty folder"
            )
        if record is not None and record.get("kind") != "compare":
            raise ConfigError(f"{where} holds an optiplug training run, not a compare; choose a new or empty folder")
        listed = list(record.get("files") or []) if record else []
        foreign = [name for name in entries if name not in {*listed, MARKER, MARKER_TMP}]
        if foreign:
            shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
            raise ConfigError(
                f"{where} holds files optiplug compare did not write ({shown}); choose a new or empty folder "
                "(optiplug never overwrites files it did not write)"
            )
    files = {*listed, MARKER, *COMPARE_FILES, *names, *(f"{name}.log" for name in names)}
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"status": "running", "kind": "compare", "started": started, "files": sorted(files)}


# ---- progress, table, JSON and chart --------------------------------------------------------


class _Progress:
    """A rich progress display: the optimizer running, its step (read from the Trainer's progress bar), elapsed time."""

    def __init__(self, names: list[str], steps: int, enabled: bool):
        self.names, self.steps, self.enabled = names, steps, enabled
        self.log: Path | None = None
        self._step_pattern = re.compile(rf"(\d+)/{steps}\b")
        self._last_read = 0.0

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self.progress = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), transient=False,
            )  # fmt: skip
            self.progress.__enter__()
            self.overall = self.progress.add_task("optimizers", total=len(self.names))
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.progress.__exit__(*exc)

    def start(self, name: str, log: Path) -> None:
        self.log = log
        if self.enabled:
            index = self.names.index(name) + 1
            self.task = self.progress.add_task(f"{name} ({index}/{len(self.names)}) steps", total=self.steps)

    def poll(self, elapsed: float) -> None:
        if not self.enabled or self.log is None or elapsed - self._last_read < 0.5:
            return
        self._last_read = elapsed
        try:
            with open(self.log, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
                tail = f.read().decode(errors="replace")
        except OSError:
            return
        found = self._step_pattern.findall(tail)
        if found:
            self.progress.update(self.task, completed=min(int(found[-1]), self.steps))

    def finish(self, run: CompareRun) -> None:
        self._last_read = 0.0
        if self.enabled:
            status = "done" if run.ok else "[red]failed[/red]"
            self.progress.update(
                self.task, completed=self.steps if run.ok else None, description=f"{run.optimizer}: {status}"
            )
            self.progress.advance(self.overall)


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(runs: list[CompareRun]) -> None:
    """The comparison table, then one line per failed run with its error."""
    from rich.console import Console
    from rich.table import Table

    from optiplug.app.estimate import format_bytes

    table = Table()
    evaluated = any(run.eval_losses for run in runs)
    columns = ["optimizer", "final loss", "eval loss", "best eval", "steps/s", "tokens/s", "optimizer state"]
    columns += ["peak RSS", "wall s"]
    if not evaluated:
        columns = [c for c in columns if c not in ("eval loss", "best eval")]
    for column in columns:
        table.add_column(column, justify="left" if column == "optimizer" else "right", no_wrap=True)
    for run in runs:
        if run.ok:
            state = format_bytes(run.optimizer_state_bytes) if run.optimizer_state_bytes is not None else "-"
            peak = format_bytes(run.peak_rss_bytes) if run.peak_rss_bytes is not None else "-"
            evals = [_fmt(run.final_eval_loss, ".4f"), _fmt(run.best_eval_loss, ".4f")] if evaluated else []
            table.add_row(
                run.optimizer, _fmt(run.final_loss, ".4f"), *evals, _fmt(run.steps_per_second, ".2f"),
                _fmt(run.tokens_per_second, ",.0f"), state, peak, f"{run.wall_seconds:.1f}",
            )  # fmt: skip
        else:
            table.add_row(run.optimizer, "[red]failed[/red]", *[""] * (len(columns) - 3), f"{run.wall_seconds:.1f}")
    console = Console(width=max(120, Console().width))
    console.print(table)
    for run in runs:
        if not run.ok:
            console.print(
                f"{run.optimizer} failed: {run.error} (log: {run.log})",
                soft_wrap=True,
                markup=False,
                highlight=False,
            )


def write_outputs(
    runs: list[CompareRun], output: Path, *, config: str | Path | None, steps: int, overrides: Sequence[str]
) -> None:
    """Write ``compare.json`` and ``compare.png`` into ``output``."""
    data = {
        "config": None if config is None else str(config),
        "steps": steps,
        "overrides": list(overrides),
        "runs": [asdict(run) for run in runs],
    }
    (output / COMPARE_FILES[0]).write_text(json.dumps(data, indent=2) + "\n")
    plot(runs, output / COMPARE_FILES[1], title=f"{Path(config).name if config else 'embedded run'}, {steps} steps")


def plot(runs: list[CompareRun], path: Path, title: str = "") -> None:
    """Loss curves (training, and evaluation when the runs have it) and learning-rate schedules of the runs,
    then their optimizer state and peak memory as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluated = any(run.eval_losses for run in runs)
    panels = 5 if evaluated else 4
    ratios = [3, 3, 2, 1.4, 1.4] if evaluated else [3, 2, 1.4, 1.4]
    fig, axes = plt.subplots(1, panels, figsize=(18 + 5 * evaluated, 4.5), gridspec_kw={"width_ratios": ratios})
    curves, rates, state, rss = axes[0], axes[-3], axes[-2], axes[-1]
    for run in runs:
        for panel, points, marker in ((curves, run.losses, "o"), (axes[1], run.eval_losses, "s")):
            if points and (evaluated or panel is curves):
                steps, losses = zip(*points)
                panel.plot(
                    steps, losses, label=run.optimizer, linewidth=1.5, color=f"C{runs.index(run)}",
                    marker=marker if len(steps) <= 30 else None, markersize=3,
                )  # fmt: skip
    curves.set(xlabel="step", ylabel="training loss", title="loss")
    if evaluated:
        axes[1].set(xlabel="step", ylabel="eval loss", title="evaluation loss")
        axes[1].grid(alpha=0.3)
        axes[1].legend()
    for run in runs:
        if run.learning_rates:
            lr_steps, lr_values = zip(*run.learning_rates)
            rates.plot(lr_steps, lr_values, label=run.optimizer, linewidth=1.5, color=f"C{runs.index(run)}")
    rates.set(xlabel="step", ylabel="learning rate", title="learning rate")
    rates.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    rates.grid(alpha=0.3)
    curves.grid(alpha=0.3)
    if any(run.losses for run in runs):
        curves.legend()
    ok = [run for run in runs if run.ok]
    colors = {run.optimizer: f"C{i}" for i, run in enumerate(runs)}
    for axes, values, label in (
        (state, [run.optimizer_state_bytes for run in ok], "optimizer state (MiB)"),
        (rss, [run.peak_rss_bytes for run in ok], "peak RSS (MiB)"),
    ):
        names = [run.optimizer for run in ok]
        axes.barh(names, [(v or 0) / 2**20 for v in values], color=[colors[n] for n in names])
        axes.invert_yaxis()
        axes.set(xlabel="MiB", title=label)
        axes.grid(alpha=0.3, axis="x")
    rss.set_yticks(range(len(ok)), [""] * len(ok))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the command ----------------------------------------------------------------------------


def command(
    items: list[str] | None = typer.Argument(
        None,
        metavar="[CONFIG] [KEY=VALUE]...",
        help="A YAML run config (default: the embedded tiny run), then overrides for every run.",
    ),
    optimizers: str = typer.Option(..., "--optimizers", help="Comma-separated optimizer names, e.g. adamw,sgd,badam."),
    steps: int = typer.Option(20, "--steps", min=1, help="Optimizer steps per run."),
    output: Path = typer.Option(
        Path("outputs/compare"), "--output", help="Folder for the runs, compare.json and compare.png."
    ),
    timeout: float | None = typer.Option(None, "--timeout", help="Stop a run after this many seconds."),
) -> None:
    """Train the same short run with each optimizer (same seed, data and schedule) and compare them.

    Each optimizer trains in its own process, one after the other. Shows final loss, steps/s, tokens/s, optimizer state
    and peak resident memory; writes compare.json and compare.png (loss curves) to --output.

    Example: `optiplug compare examples/adamw.yaml --optimizers adamw,sgd,badam --steps 30`.
    """
    from optiplug.app.config import split_config_and_overrides

    path, overrides = split_config_and_overrides(list(items or []))
    names = [name.strip() for name in optimizers.split(",") if name.strip()]
    runs = compare(path, names, steps, output, overrides, timeout=timeout)
    print_table(runs)
    typer.echo(f"optiplug: wrote {output / 'compare.json'} and {output / 'compare.png'}", err=True)
    failed = [run.optimizer for run in runs if not run.ok]
    if failed:
        raise OptiplugError(f"{len(failed)} of {len(runs)} runs failed ({', '.join(failed)}); see the errors above")
