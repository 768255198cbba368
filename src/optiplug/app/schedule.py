"""``optiplug schedule NAME [FIELD=VALUE ...] --steps N``: a learning-rate schedule, printed and drawn.

Any registered scheduler is built, with the given fields, on a one-parameter optimizer whose
learning rate is 1, and stepped ``N`` times: the rates are the multipliers of the optimizer's
``lr`` at each step. The quickest way to check a warmup-stable-decay split before a long run.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import typer

from optiplug.errors import ConfigError

__all__ = ["command", "draw_schedule", "output_path", "schedule_rates"]

FRACTIONS = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0)
"""Where the printed points are, as fractions of the run."""


def schedule_rates(config, steps: int) -> list[float]:
    """The rate of each of ``steps`` optimizer steps (1 to N) under ``config``, for an optimizer lr of 1.

    Args:
        config: a scheduler config, a registered name or a mapping with ``name``.
        steps: the run's total optimizer steps.

    Raises:
        ConfigError: the scheduler follows a metric (``reduce_lr_on_plateau``): it has no curve of its own.
    """
    import torch

    from optiplug.factory import build_scheduler
    from optiplug.registry import parse_scheduler

    cfg = parse_scheduler(config)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, cfg, num_training_steps=steps)
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ConfigError(
            f"scheduler {cfg.name!r} lowers the rate when the evaluation metric stops improving: its curve depends "
            "on the run, so there is none to draw"
        )
    rates = []
    for _ in range(steps):
        rates.append(float(optimizer.param_groups[0]["lr"]))
        optimizer.step()
        scheduler.step()
    return rates


def draw_schedule(rates: list[float], title: str, path: Path) -> None:
    """Write the curve of ``rates`` (step 1 to N) as a PNG (matplotlib's Agg canvas: no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 3.6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(range(1, len(rates) + 1), rates)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("learning rate / optimizer.lr")
    axes.set_ylim(bottom=0)
    axes.set_title(textwrap.fill(title, 72), fontsize=10)  # a long list of fields wraps instead of being cut
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)


def _fields(items: list[str]) -> dict:
    from optiplug.app.values import scalar

    fields = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected FIELD=VALUE, got {item!r} (e.g. warmup_ratio=0.05)")
        if key in ("name", "scheduler.name"):
            raise ConfigError("the scheduler is the first argument, not a field: optiplug schedule NAME ...")
        fields[key.removeprefix("scheduler.")] = scalar(value)
    return fields


def output_path(path: Path) -> Path:
    """The image file ``--output`` names, checked before anything is printed: a name without a suffix gets
    ``.png`` (what matplotlib writes), another suffix must be a format matplotlib writes, and the file must be
    writable (tried: created and removed again when it did not exist).

    Raises:
        ConfigError: one line saying what to do.
    """
    from matplotlib.backend_bases import FigureCanvasBase

    if path.is_dir():
        raise ConfigError(f"--output: {str(path)!r} is a directory; give a file name (e.g. {path / 'schedule.png'})")
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        shown = ", ".join(f".{f}" for f in sorted(formats))
        raise ConfigError(
            f"--output: {str(path)!r}: matplotlib does not write {path.suffix!r} images; end the name with one of "
            f"{shown} (no suffix: .png)"
        )
    if path.is_dir():
        raise ConfigError(f"--output: {str(path)!r} is a directory; give a file name (e.g. {path / 'schedule.png'})")
    if not path.parent.is_dir():
        raise ConfigError(f"--output: the directory {str(path.parent)!r} does not exist")
    existed = path.exists()
    try:
        with open(path, "ab"):
            pass
    except OSError as error:
        raise ConfigError(
            f"--output: cannot write {str(path)!r} ({error.strerror or error}); choose a file you can write"
        ) from None
    if not existed:
        path.unlink()
    return path


def command(
    name: str = typer.Argument(..., help="A registered scheduler (`optiplug list --kind scheduler`)."),
    items: list[str] | None = typer.Argument(
        None, metavar="[FIELD=VALUE]...", help="The scheduler's config fields (warmup_ratio=0.05)."
    ),
    steps: int = typer.Option(..., "--steps", min=1, help="The run's total optimizer steps."),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="The PNG to write (default: schedule-NAME.png in the current directory)."
    ),
) -> None:
    """Print a scheduler's learning rate at a few steps and draw its curve as a PNG.

    Example: `optiplug schedule warmup_stable_decay warmup_ratio=0.05 decay_ratio=0.2 --steps 10000`.
    """
    from optiplug.registry import parse_scheduler

    cfg = parse_scheduler({"name": name, **_fields(list(items or []))})
    path = output_path(output if output is not None else Path(f"schedule-{cfg.name}.png"))
    rates = schedule_rates(cfg, steps)
    given = cfg.model_dump(exclude={"name"}, exclude_defaults=True)
    settings = ", ".join(f"{key}={value}" for key, value in given.items())
    title = f"{cfg.name}{f' ({settings})' if settings else ''}, {steps} steps"
    typer.echo(f"{title}: learning rate as a multiple of optimizer.lr")
    shown = sorted({min(steps, max(1, round(fraction * steps))) for fraction in FRACTIONS})
    width = len(str(steps))
    for step in shown:
        typer.echo(f"  step {step:>{width}}  {rates[step - 1]:.6g}")
    top = max(rates)
    at_top = [i + 1 for i, rate in enumerate(rates) if rate >= top * (1 - 1e-12)]
    typer.echo(f"  peak {top:.6g} at steps {at_top[0]}-{at_top[-1]}; last {rates[-1]:.6g}")
    draw_schedule(rates, title, path)
    typer.echo(f"wrote {path}")
