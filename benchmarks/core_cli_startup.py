"""Start-up cost of the CLI: ``optiplug list`` vs ``python -c "import transformers"``.

``optiplug list`` loads every installed plugin and registers their entries but must not import
torch or transformers (nor build any entry's config class, the default plugin's or those of the plugins in
``plugins/``: ``LazyConfig`` entries, built when a config is first read), so it should take a fraction of what importing transformers takes
(target: ratio <= 0.3). Each command runs in a fresh process, alternating between commands,
REPETITIONS times; the medians are compared. ``python -c pass`` (the interpreter alone) and
``import torch`` are shown for scale, and the ratio is also given net of interpreter start-up.

Every command reads compiled bytecode, as an installed package does (pip compiles it): the children
run with a bytecode cache in a temporary folder (``PYTHONPYCACHEPREFIX``, filled by a first warm run)
even where the environment sets ``PYTHONDONTWRITEBYTECODE`` (an editable checkout would otherwise
compile optiplug's and the plugins' sources at every start while transformers' come compiled). The
wall-clock ratio is the target's; the CPU-time ratio (user + system of the child) is printed beside
it because it moves far less on a loaded machine.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common

REPETITIONS = 9


def _optiplug_script() -> list[str]:
    # the console script next to this interpreter (a pyenv shim on PATH would add its own start-up)
    script = Path(sys.executable).parent / "optiplug"
    if script.is_file():
        return [str(script)]
    found = shutil.which("optiplug")
    return [found] if found else [sys.executable, "-m", "optiplug"]


_ENV = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _wall(cmd: list[str], cpu: list[float] | None = None) -> float:
    """Wall seconds of one fresh process running ``cmd``; its CPU seconds are appended to ``cpu``."""
    before = _children_cpu()
    start = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, env=_ENV)
    wall = time.perf_counter() - start
    if cpu is not None:
        cpu.append(_children_cpu() - before)
    return wall


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="optiplug-pycache-") as cache:
        _ENV["PYTHONPYCACHEPREFIX"] = cache
        _measure()


def _measure() -> None:
    py = sys.executable
    commands = {
        "optiplug list": [*_optiplug_script(), "list"],
        "python -c 'import transformers'": [py, "-c", "import transformers"],
        "python -c 'import torch'": [py, "-c", "import torch"],
        "python -c 'import optiplug'": [py, "-c", "import optiplug"],
        "python -c pass": [py, "-c", "pass"],
    }
    leak = subprocess.run(
        [py, "-c", "import sys; from optiplug.app.cli import main\ntry: main(['list'])\nexcept SystemExit: pass\n"
         "print('LEAK', sorted(m for m in ('torch', 'transformers') if m in sys.modules), file=sys.stderr)"],
        capture_output=True, text=True, env=_ENV,
    ).stderr  # fmt: skip
    heavy = leak.rsplit("LEAK", 1)[-1].strip() if "LEAK" in leak else "unknown"
    for cmd in commands.values():  # warm the file cache and fill the bytecode cache
        _wall(cmd)
    cpu: dict[str, list[float]] = {name: [] for name in commands}
    times = _common.interleaved(
        {name: (lambda cmd=cmd, into=cpu[name]: _wall(cmd, into)) for name, cmd in commands.items()}, REPETITIONS
    )
    cpu_medians = {name: _common.median(values) for name, values in cpu.items()}
    cpu_ratio = cpu_medians["optiplug list"] / cpu_medians["python -c 'import transformers'"]
    medians = {name: _common.median(values) for name, values in times.items()}
    base, reference, cli = (
        medians["python -c pass"],
        medians["python -c 'import transformers'"],
        medians["optiplug list"],
    )
    ratio = cli / reference
    net = (cli - base) / (reference - base)
    rows = [
        {
            "command": name,
            "median_s": round(medians[name], 3),
            "min_s": round(min(times[name]), 3),
            "max_s": round(max(times[name]), 3),
            "ratio_vs_import_transformers": round(medians[name] / reference, 3),
            "cpu_median_s": round(cpu_medians[name], 3),
        }
        for name in commands
    ]
    for row in rows:
        print(row)
    print(
        f"optiplug list / import transformers: {ratio:.3f} (target <= 0.3); net of interpreter start-up: {net:.3f}; "
        f"CPU time: {cpu_ratio:.3f}"
    )
    notes = (
        f"Median of {REPETITIONS} fresh processes per command, commands alternating. "
        f"optiplug list / import transformers = {ratio:.3f} (target <= 0.3: {'met' if ratio <= 0.3 else 'NOT met'}); "
        f"net of interpreter start-up ((list - pass) / (transformers - pass)) = {net:.3f}; "
        f"in CPU time (user + system, steadier on a loaded machine) = {cpu_ratio:.3f}. Bytecode cached for every "
        "command, as in an installed package. "
        f"Heavy modules imported by `optiplug list`: {heavy}. "
        f"Plugins installed: {', '.join(sorted(_plugins())) or 'none'}. CPUs: {os.cpu_count()}."
    )
    _common.write_results(
        _common.script_name(__file__),
        "CLI start-up: optiplug list vs import transformers",
        rows,
        notes,
        chart={"x": "command", "y": ["median_s"], "kind": "bar", "ylabel": "seconds (median)"},
        targets={"list_vs_import_transformers": {"value": round(ratio, 3), "target": "<= 0.3", "met": ratio <= 0.3}},
    )


def _plugins() -> list[str]:
    import importlib.metadata

    return [ep.dist.name if ep.dist else ep.name for ep in importlib.metadata.entry_points(group="optiplug")]


if __name__ == "__main__":
    main()
