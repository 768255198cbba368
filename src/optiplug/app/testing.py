"""Test helpers for the app: the ``optiplug`` command run in this process or in a child process without
privileges, on a tiny run config."""

from __future__ import annotations

from pathlib import Path

__all__ = ["read_only", "run_cli", "run_cli_unprivileged", "tiny_run_config", "validate_and_train"]


def tiny_run_config(directory: Path) -> Path:
    """``directory/run.yaml``: the embedded run, 2 steps on 8 blocks of 16 tokens, written into ``directory/out``."""
    config = directory / "run.yaml"
    config.write_text(
        f"training: {{max_steps: 2, output_dir: '{directory / 'out'}'}}\ndata: {{block_size: 16, max_blocks: 8}}\n",
        encoding="utf-8",
    )
    return config


def run_cli(*argv: str) -> tuple[int, str, str]:
    """The ``optiplug`` command in this process: ``(exit code, stdout, stderr)``."""
    import contextlib
    import io

    from optiplug.app.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(argv))
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def _drop_capabilities() -> None:
    """In a forked child running as root: give up every capability, for good (the bounding set, then the
    permitted, effective and inheritable sets), so that the command it executes, still uid 0, obeys file
    permissions as any user does: a directory it owns with mode 0o555 is not writable to it."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop, linux_capability_version_3 = 24, 0x20080522
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for capability in range(last + 1):
        if libc.prctl(pr_capbset_drop, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"prctl(PR_CAPBSET_DROP, {capability})")
    header = (ctypes.c_uint32 * 2)(linux_capability_version_3, 0)
    if libc.capset(header, (ctypes.c_uint32 * 6)()) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def run_cli_unprivileged(*argv: str, timeout: float = 300) -> tuple[int, str, str]:
    """``python -m optiplug ARGV`` in a child process that file permissions bind: ``(exit code, stdout, stderr)``.

    Run by root (a CI container), the child keeps uid 0, so the interpreter, the packages and ``$HOME`` stay
    readable wherever they are installed, but it drops every capability before it executes: a directory
    made read-only with :func:`read_only` refuses it, as it refuses any user. Run by another user, the child
    is that user and nothing needs dropping. Linux only.
    """
    import os
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "optiplug", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=_drop_capabilities if os.geteuid() == 0 else None,
    )
    return done.returncode, done.stdout, done.stderr


def read_only(path: Path) -> Path:
    """``path``, created if missing, with mode 0o555: no process of :func:`run_cli_unprivileged` may write in
    it (its owner included). Make it writable again (``path.chmod(0o755)``) for the test's clean-up."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o555)
    return path


def validate_and_train(directory: Path, *overrides: str) -> tuple[tuple[int, str], tuple[int, str]]:
    """``optiplug validate`` and ``optiplug train --quiet`` of :func:`tiny_run_config` with ``overrides``, in this
    process (nothing is written outside ``directory``).

    Returns:
        ``(exit code, stderr)`` of validate, then of train.
    """
    config = str(tiny_run_config(directory))
    validated = run_cli("validate", config, *overrides)
    trained = run_cli("train", config, *overrides, "--quiet")
    return (validated[0], validated[2]), (trained[0], trained[2])
