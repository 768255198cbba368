"""The ``optiplug`` command.

User errors print one line (``optiplug: ...``) and exit 1, without a traceback. ``list``,
``show``, ``schema`` and ``plugins`` never import torch or transformers.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Iterator
from typing import Any

import typer

from optiplug.errors import OptiplugError

app = typer.Typer(
    name="optiplug",
    help="Pluggable optimizers and schedulers for transformers' Trainer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


DEBUG_ENV = "OPTIPLUG_DEBUG"
"""Set (to anything but empty or 0) to print the traceback of an error after its one line (or pass --debug)."""


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help=f"Print tracebacks of errors (or set {DEBUG_ENV}=1)."),
) -> None:
    if debug:
        os.environ[DEBUG_ENV] = "1"


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"optiplug: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def train(
    items: list[str] | None = typer.Argument(
        None,
        metavar="[CONFIG] [KEY=VALUE]...",
        help="A YAML run config (default: the embedded tiny run), then overrides.",
    ),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Processes on this machine (delegates to torchrun)."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Check the config, print the optimizer's parameter groups, and stop."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print no run header, progress or log lines; only errors."),
) -> None:
    """Train: the embedded tiny model and corpus by default, or what CONFIG says.

    Examples: `optiplug train`, `optiplug train examples/adamw.yaml optimizer.lr=3e-4`,
    `optiplug train optimizer.name=sgd training.max_steps=50`.
    """
    from optiplug.app.config import split_config_and_overrides

    path, overrides = split_config_and_overrides(list(items or []))
    from optiplug.app.config import load_config

    config = load_config(path, overrides)  # validate before starting anything
    if dry_run:
        from optiplug.app.run import check_run

        left = check_run(config)[1]  # every check train makes before its first step
        _print_groups(config)
        if left:
            typer.echo(f"optiplug: {_left_to_train(left)}", err=True)
        typer.echo("optiplug: dry run, nothing trained", err=True)
        return
    if nproc > 1:
        from optiplug.app.launch import relaunch_with_torchrun

        raise typer.Exit(relaunch_with_torchrun(nproc, [*(items or []), *(["--quiet"] if quiet else [])]))
    from optiplug.app.run import train as run_train

    try:
        result = run_train(config, quiet=quiet)
    except KeyboardInterrupt as interrupt:  # Ctrl-C or SIGTERM (optiplug.app.stopping); typer would exit silently
        _fail(*_stopped(interrupt))
    if int(os.environ.get("RANK", "0")) == 0 and not quiet:  # under torchrun, only the main process speaks
        typer.echo(f"optiplug: done, outputs in {result.output_dir}", err=True)


def _stopped(interrupt: KeyboardInterrupt) -> tuple[str, int]:
    """The line and exit status of a run stopped by Ctrl-C (130) or SIGTERM (143)."""
    from optiplug.app.stopping import EXIT_CODES, Terminated

    terminated = isinstance(interrupt, Terminated)
    default = f"{'stopped by SIGTERM' if terminated else 'interrupted'} before training started"
    return getattr(interrupt, "optiplug_message", default), EXIT_CODES[signal.SIGTERM if terminated else signal.SIGINT]


def _rows() -> list[dict[str, Any]]:
    from optiplug.registry import list_optimizers, list_schedulers

    registered: list[Any] = [*list_optimizers(), *list_schedulers()]
    return [
        {
            "name": row.name,
            "kind": row.kind,
            "plugin": row.plugin,
            "summary": row.entry.summary,
            "requires": list(row.entry.requires),
            "aliases": [
                {"name": a.name, "preset": dict(a.preset), "transformers": a.transformers, "summary": a.summary}
                for a in row.entry.aliases
            ],
        }
        for row in registered
    ]


def _with_aliases(row: dict[str, Any]) -> str:
    """The summary, then the entry's other names: ``...; also: x; transformers: adamw_torch, adamw_torch_fused``."""
    parts = [row["summary"]] if row["summary"] else []
    for label, flag in (("also", False), ("transformers", True)):
        names = [a["name"] for a in row["aliases"] if a["transformers"] is flag]
        if names:
            parts.append(f"{label}: {', '.join(names)}")
    return "; ".join(parts)


def _plugin_names(plugin: str) -> set[str]:
    """What ``--plugin`` matches for a row's plugin: its name, and the default plugin's modules as ``optiplug``."""
    return {plugin, plugin.split(":")[0]}


@app.command("list")
def list_(
    pattern: str | None = typer.Argument(
        None, metavar="[TEXT]", help="Only names (or aliases) containing TEXT, e.g. `optiplug list lion`."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    kind: str | None = typer.Option(None, "--kind", help="Only 'optimizer' or 'scheduler'."),
    plugin: str | None = typer.Option(None, "--plugin", help="Only this plugin's entries."),
) -> None:
    """List registered optimizers and schedulers with the plugin that registered each, and their aliases."""
    rows = _rows()
    if kind is not None:
        if kind not in ("optimizer", "scheduler"):
            _fail(f"--kind must be 'optimizer' or 'scheduler', got {kind!r}")
        rows = [r for r in rows if r["kind"] == kind]
    if plugin is not None:
        known = sorted({name for r in _rows() for name in _plugin_names(r["plugin"])})
        if plugin not in known:
            _fail(f"--plugin {plugin!r} registered nothing; plugins with entries: {', '.join(known)}")
        rows = [r for r in rows if plugin in _plugin_names(r["plugin"])]
    if pattern is not None:
        text = pattern.lower()
        rows = [r for r in rows if any(text in n.lower() for n in [r["name"], *(a["name"] for a in r["aliases"])])]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("optiplug: no optimizer or scheduler matches", err=True)
        _warn_failures()
        return
    # Plain aligned columns: rendering a rich table would double this command's start-up time.
    columns = ("name", "kind", "plugin", "summary")
    widths = [max(len(c), *(len(r[c]) for r in rows)) for c in columns[:-1]]
    for cells in [dict(zip(columns, columns)), *({**r, "summary": _with_aliases(r)} for r in rows)]:
        typer.echo("  ".join(str(cells[c]).ljust(w) for c, w in zip(columns, widths)) + "  " + cells["summary"])
    typer.echo(_counts(rows))
    _warn_failures()


def _counts(rows: list[dict[str, Any]]) -> str:
    """``133 optimizers and 12 schedulers from 9 plugins: optiplug-pytorch-optimizer 113 + 2, ...``."""
    kinds = [kind for kind in ("optimizer", "scheduler") if any(row["kind"] == kind for row in rows)]
    by_plugin: dict[str, dict[str, int]] = {}
    for row in rows:
        plugin = row["plugin"].split(":")[0]  # the default plugin's modules count as one plugin
        counts = by_plugin.setdefault(plugin, dict.fromkeys(kinds, 0))
        counts[row["kind"]] += 1
    totals = " and ".join(f"{sum(c[kind] for c in by_plugin.values())} {kind}s" for kind in kinds)
    parts = [
        f"{plugin} {' + '.join(str(counts[kind]) for kind in kinds)}"
        for plugin, counts in sorted(by_plugin.items(), key=lambda item: -sum(item[1].values()))
    ]
    return f"{totals} from {len(by_plugin)} plugins ({' + '.join(kind + 's' for kind in kinds)}): {', '.join(parts)}"


def _warn_failures() -> None:
    from optiplug.registry import plugin_failures

    failures = plugin_failures()
    if failures:
        names = ", ".join(f.name for f in failures)
        typer.echo(f"optiplug: {len(failures)} plugin(s) failed to load ({names}); see `optiplug plugins`", err=True)


def _type_name(annotation: Any) -> str:
    """A field's type as a reader writes it: ``tuple[float, float]``, not its validation metadata."""
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Union or origin is types.UnionType:
        return " | ".join(_type_name(arg) for arg in args)
    if origin is typing.Literal:
        return f"Literal[{', '.join(repr(arg) for arg in args)}]"
    if origin is not None:
        inner = ", ".join("..." if arg is Ellipsis else _type_name(arg) for arg in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _find_name(name: str) -> Any:
    """What ``name`` is: an optimizer or scheduler, or an alias of one (a transformers name if nothing else)."""
    from optiplug.errors import ConfigError, UnknownNameError
    from optiplug.registry import get_plugin_manager, registry

    for transformers in (False, True):
        for kind in ("optimizer", "scheduler"):
            try:
                return registry.resolve(kind, name, transformers=transformers)
            except UnknownNameError:
                continue
    names = registry.names("optimizer") + registry.names("scheduler")
    aliases = [*registry.aliases("optimizer"), *registry.aliases("scheduler")]
    note = registry.left_out_note()  # a plugin the environment left out, before any install hint
    if note:
        raise UnknownNameError("optimizer or scheduler", name, names, also=aliases, note=note)
    default = get_plugin_manager().get_plugin("optiplug:transformers")  # a transformers name it refuses
    if default is not None and getattr(default, "knows_transformers_name", lambda _: False)(name):
        raise ConfigError(default.transformers_hint(name))
    raise UnknownNameError("optimizer or scheduler", name, names, also=aliases)


@app.command()
def show(name: str = typer.Argument(..., help="An optimizer or scheduler name, or an alias.")) -> None:
    """Show the config fields (type, default, description), plugin, aliases and required packages of NAME."""
    from pydantic_core import PydanticUndefined

    from optiplug.configs import OptimizerConfig

    found = _find_name(name)
    row = found.row
    if found.alias is not None:
        alias = found.alias
        what = "transformers' name for " if alias.transformers else "an alias of "
        typer.echo(f"{name}: {what}{row.kind} {row.name!r} with {alias.describe()}")
        if alias.summary:
            typer.echo(f"  {alias.summary}")
    config = row.entry.config
    typer.echo(f"{row.name}  ({row.kind}, plugin {row.plugin})")
    if row.entry.summary:
        typer.echo(f"  {row.entry.summary}")
    doc = (config.__doc__ or "").strip()
    if doc and doc != row.entry.summary:
        typer.echo(f"  {doc.splitlines()[0]}")
    if row.entry.requires:
        typer.echo(f"  requires: {', '.join(row.entry.requires)}")
    for alias in row.entry.aliases:
        where = "transformers' name" if alias.transformers else "alias"
        typer.echo(f"  {where} {alias.name}: {alias.describe()}" + (f" ({alias.summary})" if alias.summary else ""))
    if row.kind == "optimizer":
        per_parameter = row.entry.per_parameter
        typer.echo(f"  layerwise: {'supported' if per_parameter else 'not supported (the entry is not per-parameter)'}")
        if row.entry.default_scheduler:
            typer.echo(f"  scheduler when the run names none: {row.entry.default_scheduler}")
    typer.echo("fields:")
    common = OptimizerConfig.model_fields if row.kind == "optimizer" else {}
    # the fields every optimizer has (param_groups, ...) after the optimizer's own
    for field_name, field in sorted(config.model_fields.items(), key=lambda item: item[0] in common):
        if field_name == "name":
            continue
        default = field.default
        if default is PydanticUndefined:
            default = field.default_factory() if field.default_factory else "(required)"
        line = f"  {field_name}: {_type_name(field.annotation)} = {default!r}"
        if field.description:
            line += f"  # {field.description}"
        typer.echo(line)
    if row.kind == "optimizer":
        from optiplug.params import NO_DECAY_RULE

        typer.echo(f"weight decay: {NO_DECAY_RULE}.")


@app.command()
def schema(
    indent: int = typer.Option(2, help="JSON indentation."),
) -> None:
    """Print the JSON Schema of the run config (every registered optimizer and scheduler), for editor completion."""
    from optiplug.app.config import run_config_schema

    typer.echo(json.dumps(run_config_schema(), indent=indent))


@app.command()
def validate(
    items: list[str] = typer.Argument(..., metavar="CONFIG [KEY=VALUE]...", help="A YAML run config, then overrides."),
    groups: bool = typer.Option(
        False, "--groups", help="Also build the optimizer on the model and print its parameter groups."
    ),
) -> None:
    """Run every check train runs before its first step, without loading weights or writing anything.

    The sections, the Trainer arguments, the files, then the optimizer and scheduler built on the
    model's skeleton (no weights). Checks that need real weights are listed, and run at train.

    With --groups the model is loaded and the optimizer built: each parameter group is printed
    (optimizer.param_groups label, pattern, tensors, parameters, lr, weight decay).
    """
    from optiplug.app.config import split_config_and_overrides

    path, overrides = split_config_and_overrides(items)
    if path is None:
        _fail("validate needs a config file")
    from optiplug.app.config import load_config
    from optiplug.app.run import check_run

    config = load_config(path, overrides)
    left = check_run(config)[1]  # every check train makes before its first step, on the model's skeleton
    if groups:
        _print_groups(config)
    note = f"; {_left_to_train(left)}" if left else ""
    typer.echo(f"{path}: ok (optimizer {config.optimizer.name}, scheduler {config.scheduler.name}{note})")


def _left_to_train(left: list[str]) -> str:
    """``2 checks need real weights (or the data) and run at train: a (why), b (why)``."""
    checks = "check needs" if len(left) == 1 else "checks need"
    return f"{len(left)} {checks} real weights (or the data) and run at train: {', '.join(left)}"


def _print_groups(config: Any) -> None:
    from optiplug.app.groups import group_rows, groups_table, run_model
    from optiplug.context import ParamShape
    from optiplug.registry import get_entry

    model = run_model(config)
    describe = get_entry(config.optimizer.name).describe
    line = describe(ParamShape.of_model(model), config.optimizer) if describe is not None else None
    typer.echo(groups_table(config, group_rows(config, model), line))


@app.command()
def plugins(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List loaded plugins with their versions and hooks, and plugins that failed to load with the cause."""
    from optiplug.registry import loaded_plugins, plugin_failures

    loaded, failed = loaded_plugins(), plugin_failures()
    # A loaded plugin can still have left names out (a name another plugin gives too): shown with it. A plugin
    # whose register hook raised is not loaded: it is listed as failed.
    left_out = {p.name: [f.cause for f in failed if f.name == p.name] for p in loaded}
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "loaded": [
                        {
                            "name": p.name,
                            "distribution": p.distribution,
                            "version": p.version,
                            "hooks": list(p.hooks),
                            "failures": left_out[p.name],
                        }
                        for p in loaded
                    ],
                    "failed": [{"name": f.name, "cause": f.cause} for f in failed],
                },
                indent=2,
            )
        )
        return
    for p in loaded:
        version = f" {p.version}" if p.version else ""
        typer.echo(
            f"{p.name} ({p.distribution or 'registered at run time'}{version}): {', '.join(p.hooks) or 'no hooks'}"
        )
        for cause in left_out[p.name]:
            typer.echo(f"  FAILED {cause}")
    for f in failed:
        if f.name not in left_out:
            typer.echo(f"FAILED {f.name}: {f.cause}")


def _register_commands() -> None:
    """``estimate``, ``compare`` and ``schedule`` live in their own modules, which import the run config (and YAML):
    registered only when the command line does not name one of this module's light commands (``list``, ``show``,
    ...), so those start without them."""
    if any(command.name == "estimate" for command in app.registered_commands):
        return
    from optiplug.app import compare, estimate, schedule

    app.command("estimate")(estimate.command)
    app.command("compare")(compare.command)
    app.command("schedule")(schedule.command)


def _own_commands() -> set[str]:
    return {str(command.name or getattr(command.callback, "__name__", "")) for command in app.registered_commands}


def _command_word(args: list[str]) -> str | None:
    """The command a command line names (the first word that is not an option: the only global option is a flag)."""
    return next((arg for arg in args if not arg.startswith("-")), None)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``optiplug`` console script (``argv`` None: this process's own command line).

    Run as a process of a launcher (torchrun, accelerate launch, deepspeed), it ends through
    :func:`optiplug.process_group.exit_process`: the process group destroyed, the exit handlers run,
    then ``os._exit``, so that no rank of a finished run aborts at exit beside gloo's threads.
    """
    with _one_line_warnings():
        code = _main(argv)
    if argv is None:
        from optiplug.app.launch import under_launcher

        if under_launcher():
            from optiplug.process_group import exit_process

            exit_process(code)
    sys.exit(code)


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """optiplug's own warnings (a plugin that failed to load, an unknown name in OPTIPLUG_DISABLE_PLUGINS) print
    as the one line they are, once, not with the file and source line of the code that warned."""
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
            if str(message).startswith("optiplug: "):
                print(message, file=sys.stderr if file is None else file)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def _main(argv: list[str] | None) -> int:
    """Run the command; its exit status (the one-line messages printed)."""
    if _command_word(sys.argv[1:] if argv is None else argv) not in _own_commands():
        _register_commands()
    try:
        app(args=argv, prog_name="optiplug", standalone_mode=True)
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        typer.echo(str(exit_.code), err=True)  # what the interpreter prints for sys.exit("message")
        return 1
    except OptiplugError as error:
        if _debug():
            traceback.print_exc()
        typer.echo(f"optiplug: {error}", err=True)
        return 1
    except Exception as error:  # not a user error: one line, the traceback with --debug
        if _debug():
            traceback.print_exc()
        first = (str(error).strip().splitlines() or [""])[0]
        typer.echo(
            f"optiplug: unexpected {type(error).__name__}: {first} (run with --debug for the traceback)", err=True
        )
        return 1
    except KeyboardInterrupt:
        typer.echo("optiplug: interrupted", err=True)
        return 130
    return 0


if __name__ == "__main__":
    main()
