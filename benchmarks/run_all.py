"""Run every benchmark, one at a time, then regenerate ``docs/benchmarks.md`` from the results.

    python benchmarks/run_all.py                    # run all, then write the report
    python benchmarks/run_all.py --only core_overhead,galore_memory
    python benchmarks/run_all.py --report-only      # rewrite the report from benchmarks/results/*.json

Scripts are ``benchmarks/*.py`` except this one and files starting with ``_``. They run one
after another, never in parallel: they time things, and would compete for the CPU. Each writes
``benchmarks/results/<script>.json`` (``{"title", "rows": [{...}], "notes"}``, optionally
``chart`` and ``targets``); a script's output goes to ``outputs/benchmark-logs/<script>.log``.
The report has a table and a chart (``docs/img/<script>.png``) per result file, and states the
fixed model sizes of ``_common.MODEL_SIZES``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import _common

ROOT = _common.HERE.parent
DOC = ROOT / "docs" / "benchmarks.md"
IMG = ROOT / "docs" / "img"
LOGS = ROOT / "outputs" / "benchmark-logs"
RUNS = _common.RESULTS_DIR / "_runs.json"
TIMEOUT_S = 900


def scripts() -> list[Path]:
    """The benchmark scripts, core ones first."""
    found = [p for p in _common.HERE.glob("*.py") if not p.name.startswith("_") and p.name != Path(__file__).name]
    return sorted(found, key=lambda p: (not p.stem.startswith("core_"), p.stem))


# ---- running --------------------------------------------------------------------------------


def run_scripts(selected: list[Path], timeout: float) -> dict[str, dict[str, Any]]:
    """Run each script in its own process, in order; return what happened to each."""
    from optiplug.app.compare import run_process

    runs: dict[str, dict[str, Any]] = {}
    for i, script in enumerate(selected, 1):
        result_file = _common.RESULTS_DIR / f"{script.stem}.json"
        before = result_file.stat().st_mtime if result_file.exists() else None
        print(f"[{i}/{len(selected)}] {script.name} ...", flush=True)
        started = time.time()
        process = run_process([sys.executable, str(script)], LOGS / f"{script.stem}.log", cwd=ROOT, timeout=timeout)
        wrote = (
            result_file.exists() and result_file.stat().st_mtime != before and result_file.stat().st_mtime >= started
        )
        status = "ok" if process.returncode == 0 and wrote else "failed"
        error = None
        if process.returncode != 0:
            error = "timed out" if process.returncode == -9 else process.error_line()
        elif not wrote:
            error = f"exited 0 but did not write {result_file.relative_to(ROOT)}"
        runs[script.stem] = {
            "script": f"benchmarks/{script.name}",
            "status": status,
            "error": error,
            "wall_s": round(process.wall_seconds, 1),
            "peak_rss_mib": _common.mib(process.peak_rss_bytes),
            "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        print(f"    {status} in {process.wall_seconds:.1f} s" + (f": {error}" if error else ""), flush=True)
    return runs


# ---- the report -----------------------------------------------------------------------------


def check_result(data: Any) -> str | None:
    """Why ``data`` is not a result in the agreed format, or None."""
    if not isinstance(data, dict):
        return f"expected a JSON object, got {type(data).__name__}"
    missing = [key for key in ("title", "rows", "notes") if key not in data]
    if missing:
        return f"missing key(s): {', '.join(missing)}"
    if not isinstance(data["title"], str):
        return "'title' is not a string"
    if not isinstance(data["rows"], list) or not all(isinstance(row, dict) for row in data["rows"]):
        return "'rows' is not a list of objects"
    if not isinstance(data["notes"], (str, list)):
        return "'notes' is not a string"
    return None


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, (list, dict)):
        value = json.dumps(value, separators=(",", ":"))
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of ``rows``; the columns are every key, in order of first appearance."""
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    if not columns:
        return "_(no rows)_"
    numeric = {
        c for c in columns
        if all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) and any(r.get(c) is not None for r in rows)
    }  # fmt: skip
    lines = [
        "| " + " | ".join(columns) + " |",
        "| " + " | ".join("---:" if c in numeric else "---" for c in columns) + " |",
    ]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def chart_spec(data: dict[str, Any]) -> dict[str, Any] | None:
    """The chart to draw: the result's own ``chart``, else a bar chart of its ratio columns (``*ratio*``, ``vs_*``)
    labelled by its text columns that vary."""
    rows = data["rows"]
    if not rows:
        return None
    spec = data.get("chart")
    if isinstance(spec, dict) and spec.get("x") and spec.get("y"):
        ys = [spec["y"]] if isinstance(spec["y"], str) else list(spec["y"])
        return {"kind": spec.get("kind", "bar"), "x": spec["x"], "y": ys, "ylabel": spec.get("ylabel", ""),
                "logy": bool(spec.get("logy", False)), "target": spec.get("target")}  # fmt: skip
    columns = list(rows[0])
    text = [c for c in columns if all(isinstance(r.get(c), str) for r in rows)]
    varying = [c for c in text if len({r[c] for r in rows}) > 1] or text[:1]
    ratios = [c for c in columns if ("ratio" in c or c.startswith("vs_")) and all(_number(r.get(c)) for r in rows)]
    if not varying or not ratios:
        return None
    return {"kind": "bar", "x": varying, "y": ratios, "ylabel": "ratio", "logy": False, "target": None}


def draw_chart(name: str, data: dict[str, Any], spec: dict[str, Any], path: Path) -> bool:
    """Draw ``spec`` from ``data['rows']`` into ``path``; False when the rows do not fit the spec."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [spec["x"]] if isinstance(spec["x"], str) else list(spec["x"])
    rows = [r for r in data["rows"] if all(x in r for x in xs)]
    ys = [y for y in spec["y"] if any(_number(r.get(y)) for r in rows)]
    if not rows or not ys:
        return False
    labels = [" / ".join(str(r[x]) for x in xs) for r in rows]
    if len(set(labels)) < len(labels):  # tell the rows apart by the first other column that does
        for column in (c for c in rows[0] if c not in xs and c not in ys):
            extended = [f"{label}, {column}={_cell(r.get(column))}" for label, r in zip(labels, rows)]
            if len(set(extended)) == len(extended):
                labels = extended
                break
    line = spec["kind"] == "line" and len(xs) == 1 and all(_number(r[xs[0]]) for r in rows)
    # many or long labels read better on horizontal bars
    horizontal = not line and (len(rows) * len(ys) > 12 or max(map(len, labels)) > 24)
    if horizontal:
        fig, axes = plt.subplots(figsize=(9, max(2.8, 1.4 + 0.32 * len(rows) * len(ys))))
    else:
        fig, axes = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) * len(ys) + 2), 4))
    value_axis = "x" if horizontal else "y"
    if line:
        for y in ys:
            points = [(r[xs[0]], r[y]) for r in rows if _number(r.get(y))]
            axes.plot(*zip(*points), marker="o", label=y)
        axes.set_xlabel(xs[0])
    else:
        width = 0.8 / len(ys)
        for i, y in enumerate(ys):
            values = [r[y] if _number(r.get(y)) else 0.0 for r in rows]
            positions = [p + (i - (len(ys) - 1) / 2) * width for p in range(len(rows))]
            if horizontal:
                axes.barh(positions, values, height=width, label=y)
            else:
                axes.bar(positions, values, width=width, label=y)
        if horizontal:
            axes.set_yticks(range(len(rows)), labels)
            axes.invert_yaxis()
        else:
            tilt = max(map(len, labels)) > 10
            axes.set_xticks(range(len(rows)), labels, rotation=20 if tilt else 0, ha="right" if tilt else "center")
    if _number(spec.get("target")):
        mark = axes.axvline if horizontal else axes.axhline
        mark(spec["target"], color="grey", linestyle="--", linewidth=1, label=f"target {spec['target']}")
    if spec.get("logy"):
        (axes.set_xscale if horizontal else axes.set_yscale)("log")
    (axes.set_xlabel if horizontal else axes.set_ylabel)(spec.get("ylabel") or (ys[0] if len(ys) == 1 else ""))
    axes.set_title(textwrap.fill(data["title"], 70), fontsize=10)
    axes.grid(alpha=0.3, axis=value_axis)
    if len(ys) > 1 or _number(spec.get("target")):
        axes.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _targets(data: dict[str, Any]) -> list[str]:
    lines = []
    for key, target in (data.get("targets") or {}).items():
        if isinstance(target, dict):
            met = target.get("met")
            verdict = "met" if met else ("**not met**" if met is not None else "")
            lines.append(
                f"- target `{key}` {target.get('target', '')}: measured {_cell(target.get('value'))} {verdict}".rstrip()
            )
    return lines


def model_sizes_section() -> str:
    rows = []
    for name, size in _common.MODEL_SIZES.items():
        total = size.parameters()
        rows.append({
            "size": name, "vocab": size.vocab, "hidden": size.hidden, "intermediate": size.intermediate,
            "layers": size.layers, "heads": size.heads, "parameters": total,
            "embedding + head share": f"{2 * size.vocab * size.hidden / total:.1%}",
        })  # fmt: skip
    return (
        "## Model sizes\n\n"
        "Every benchmark uses one of these fixed Llama-style shapes (`benchmarks/_common.py`, `MODEL_SIZES`): "
        "untied embedding and head as in Llama-2, and a small vocabulary so that, as in a real 7B model, the "
        "transformer blocks' linear layers hold nearly all weights (Llama-2-7B: embedding + head 3.9%). "
        "The names are size classes: `100M` has 88.1M parameters. "
        f"Sequences are {_common.SEQ_LEN} tokens unless a section says otherwise.\n\n" + markdown_table(rows) + "\n"
    )


def write_report(runs: dict[str, dict[str, Any]]) -> list[str]:
    """Write ``docs/benchmarks.md`` and its charts; return the problems found in result files."""
    problems: list[str] = []
    results: list[tuple[str, dict[str, Any]]] = []
    order = {p.stem: i for i, p in enumerate(scripts())}
    files = sorted(
        (p for p in _common.RESULTS_DIR.glob("*.json") if not p.name.startswith("_")),
        key=lambda p: (order.get(p.stem, len(order)), p.stem),
    )
    for path in files:
        try:
            data = json.loads(path.read_text())
        except ValueError as error:
            problems.append(f"`{path.relative_to(ROOT)}`: not valid JSON ({error})")
            continue
        problem = check_result(data)
        if problem:
            problems.append(f"`{path.relative_to(ROOT)}`: {problem}")
            continue
        results.append((path.stem, data))

    machine = _common.machine()
    out = [
        "# Benchmarks",
        "",
        "<!-- generated by benchmarks/run_all.py; do not edit by hand -->",
        "",
        f"Generated by `python benchmarks/run_all.py` on {datetime.date.today().isoformat()}, on a machine with "
        f"{machine['cpus']} CPUs (Python {machine['python']}, torch {machine['torch']}, transformers "
        f"{machine['transformers']}). Every figure is a ratio or a size measured side by side in one run of one "
        "script; absolute times depend on the machine and its load and are shown only for context. "
        "Re-run one script with `python benchmarks/<script>.py`, then `python benchmarks/run_all.py --report-only`. "
        "Every figure is a CPU figure unless its section says GPU: no GPU was available where these ran "
        "(benchmarks/gpu_acceptance.py is the prepared script for one).",
        "",
    ]
    targets = [(name, data) for name, data in results if data.get("targets")]
    if targets:
        out += ["## Targets", "", "| benchmark | target | measured | met |", "| --- | --- | ---: | --- |"]
        for name, data in targets:
            for key, target in data["targets"].items():
                if isinstance(target, dict):
                    met = target.get("met")
                    out.append(
                        f"| [{name}](#{_anchor(data['title'])}) | `{key}` {target.get('target', '')} | "
                        f"{_cell(target.get('value'))} | {'yes' if met else 'no' if met is not None else '–'} |"
                    )
        out.append("")
    out += [model_sizes_section()]
    for name, data in results:
        out += [f"## {data['title']}", "", f"`benchmarks/{name}.py`", ""]
        notes = data["notes"] if isinstance(data["notes"], str) else " ".join(map(str, data["notes"]))
        if notes:
            out += [notes, ""]
        target_lines = _targets(data)
        if target_lines:
            out += [*target_lines, ""]
        out += [markdown_table(data["rows"]), ""]
        spec = chart_spec(data)
        image = IMG / f"{name}.png"
        if spec and draw_chart(name, data, spec, image):
            out += [f"![{data['title']}](img/{image.name})", ""]
        elif image.exists():
            image.unlink()
    failed = [run for run in runs.values() if run["status"] != "ok"]
    missing = [p.stem for p in scripts() if not (_common.RESULTS_DIR / f"{p.stem}.json").exists()]
    if failed or missing or problems:
        out += ["## Not reported", ""]
        out += [f"- `{run['script']}` failed: {run['error']}" for run in failed]
        out += [f"- `benchmarks/{name}.py` has no result file yet" for name in missing if name not in {
            Path(run["script"]).stem for run in failed}]  # fmt: skip
        out += [f"- {problem}" for problem in problems]
        out.append("")
    if runs:
        out += ["## Runs", "", markdown_table(list(runs.values())), ""]
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(out).rstrip() + "\n")
    return problems


def _anchor(title: str) -> str:
    import re

    return re.sub(r"[^\w\- ]", "", title.lower()).strip().replace(" ", "-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated script names (without .py) to run")
    parser.add_argument("--report-only", action="store_true", help="do not run anything; rewrite the report")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds before a script is stopped")
    args = parser.parse_args(argv)

    previous = json.loads(RUNS.read_text()) if RUNS.exists() else {}
    available = {p.stem: p for p in scripts()}
    if args.only:
        wanted = [name.strip().removesuffix(".py") for name in args.only.split(",") if name.strip()]
        unknown = [name for name in wanted if name not in available]
        if unknown:
            parser.error(f"no benchmark named {', '.join(unknown)}; available: {', '.join(available)}")
        selected = [available[name] for name in wanted]
    else:
        selected = list(available.values())
    runs = previous
    if not args.report_only:
        runs = {**previous, **run_scripts(selected, args.timeout)}
        _common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        RUNS.write_text(json.dumps(runs, indent=2) + "\n")
    runs = {name: runs[name] for name in available if name in runs}
    problems = write_report(runs)
    print(f"wrote {DOC.relative_to(ROOT)}")
    for problem in problems:
        print(f"result file not in the expected format: {problem}")
    failed = [name for name, run in runs.items() if run["status"] != "ok"]
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
