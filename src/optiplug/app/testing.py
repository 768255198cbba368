"""Test helpers for the app: the ``optiplug`` command run in this process, on a tiny run config."""

from __future__ import annotations

from pathlib import Path

__all__ = ["run_cli", "tiny_run_config", "validate_and_train"]


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
