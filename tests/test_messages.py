"""Issue 19, class E: each message says what is wrong in the user's words, once, before anything is printed or
written, and blames the right party."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import optiplug
from optiplug import ConfigError
from optiplug.app.testing import read_only, run_cli, run_cli_unprivileged
from optiplug.registry import reload_plugins

PY = sys.executable


def optiplug_command(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, "-m", "optiplug", *argv], capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}
    )


# ---- optiplug schedule --output -----------------------------------------------------------------


def test_schedule_output_without_a_suffix_says_the_file_it_wrote(tmp_path):
    code, out, _ = run_cli("schedule", "cosine", "--steps", "10", "--output", str(tmp_path / "mycurve"))
    assert code == 0 and out.splitlines()[-1] == f"wrote {tmp_path / 'mycurve.png'}"
    assert (tmp_path / "mycurve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mycurve.png"]


def test_schedule_output_that_cannot_be_written_is_one_line_before_the_table(tmp_path):
    code, out, err = run_cli("schedule", "cosine", "--steps", "10", "--output", str(tmp_path / "curve.v2"))
    assert (
        code == 1
        and out == ""
        and err.startswith(
            f"optiplug: --output: '{tmp_path / 'curve.v2'}': matplotlib does not write '.v2' images; end the name with "
            "one of "
        )
    )
    assert err.endswith(" .png, .ps, .raw, .rgba, .svg, .svgz, .tif, .tiff, .webp (no suffix: .png)\n")
    code, out, err = run_cli("schedule", "cosine", "--steps", "10", "--output", str(tmp_path))
    assert (
        code == 1
        and out == ""
        and err
        == (f"optiplug: --output: '{tmp_path}' is a directory; give a file name (e.g. {tmp_path / 'schedule.png'})\n")
    )
    locked = read_only(tmp_path / "locked")
    target = locked / "curve.png"
    try:  # a child process that file permissions bind, root included
        code, out, err = run_cli_unprivileged("schedule", "cosine", "--steps", "10", "--output", str(target))
    finally:
        locked.chmod(0o755)
    assert code == 1 and out == ""
    assert err == f"optiplug: --output: cannot write '{target}' (Permission denied); choose a file you can write\n"
    assert not target.exists()


# ---- the Python API and config sections ---------------------------------------------------------


def test_build_scheduler_without_an_optimizer_blames_the_call_not_the_plugin():
    with pytest.raises(ConfigError) as info:
        optiplug.build_scheduler(None, "cosine", num_training_steps=10)
    assert str(info.value) == (
        "build_scheduler: expected an optimizer (with param_groups) to schedule, got NoneType; build it first "
        "(optiplug.build_optimizer(model, ...)) and pass it"
    )
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    assert optiplug.build_scheduler(optimizer, "cosine", num_training_steps=10) is not None


@pytest.mark.parametrize(
    ("yaml", "message"),
    [
        ("optimizer: 5\n", "optimizer: expected a name (optimizer: adamw) or a mapping with a 'name' key "
         "(optimizer: {name: adamw, ...}), got 5 (a number)"),
        ("scheduler: [cosine]\n", "scheduler: expected a name (scheduler: cosine) or a mapping with a 'name' key "
         "(scheduler: {name: cosine, ...}), got ['cosine'] (a list)"),
    ],
)  # fmt: skip
def test_a_section_that_is_not_a_name_or_a_mapping_says_what_it_got(tmp_path, yaml, message):
    config = tmp_path / "run.yaml"
    config.write_text(yaml)
    code, _, err = run_cli("validate", str(config))
    assert code == 1 and err == f"optiplug: {message}\n"


# ---- plugins the environment leaves out, and plugins that fail -----------------------------------


@pytest.fixture
def plugin_environment():
    """Set OPTIPLUG_* variables for a reload of the registry; afterwards only these are undone (not the test's
    other patches) and the registry is reloaded as it was."""
    with pytest.MonkeyPatch.context() as patch:
        yield patch
    reload_plugins()


def test_a_disabled_plugins_name_says_it_is_disabled_and_by_what(plugin_environment):
    plugin_environment.setenv("OPTIPLUG_DISABLE_PLUGINS", "galore")
    reload_plugins()
    note = (
        "(OPTIPLUG_DISABLE_PLUGINS=galore left out plugin optiplug-galore, which may register it: "
        "change that variable to load it)"
    )
    with pytest.raises(optiplug.UnknownNameError) as info:
        optiplug.parse_optimizer({"name": "galore_adamw", "rank": 8})
    assert str(info.value).startswith(f"unknown optimizer 'galore_adamw' {note}.")
    code, _, err = run_cli("show", "galore_adamw")
    assert code == 1 and err.startswith(f"optiplug: unknown optimizer or scheduler 'galore_adamw' {note}.")


def test_an_unknown_name_in_the_plugin_variables_is_one_warning_line(tmp_path):
    done = optiplug_command(
        "list", "--kind", "scheduler", env={"OPTIPLUG_DISABLE_PLUGINS": "galor", "OPTIPLUG_LOAD_PLUGINS": "badam,muonn"}
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert [line.split(" (installed: ")[0] for line in lines] == [
        "optiplug: OPTIPLUG_LOAD_PLUGINS names no installed plugin 'muonn'",
        "optiplug: OPTIPLUG_DISABLE_PLUGINS names no installed plugin 'galor'",
    ]
    assert all(", badam, " in line and line.endswith("; see `optiplug plugins`)") for line in lines)


def test_a_plugin_that_fails_to_import_is_one_clean_line(tmp_path):
    """Not Python's RuntimeWarning with optiplug's file name and source line: one line, on every command."""
    site = tmp_path / "site"
    info = site / "acme_broken-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[optiplug]\nbroken = acme_broken_plugin\n")
    (site / "acme_broken_plugin.py").write_text("raise RuntimeError('the kernel is not compiled')\n")
    done = optiplug_command("list", "--kind", "scheduler", env={"PYTHONPATH": str(site)})
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "optiplug: plugin 'acme-broken' was not loaded: failed to import 'acme_broken_plugin': RuntimeError: "
        "the kernel is not compiled",
        "optiplug: 1 plugin(s) failed to load (acme-broken); see `optiplug plugins`",
    ]


# ---- estimate -----------------------------------------------------------------------------------


def test_estimate_says_when_train_refuses_the_combination():
    code, out, _ = run_cli("estimate", "finetuning.type=lora", "--optimizers", "adamw,muon,apollo_adamw")
    assert code == 0
    notes = [line for line in out.splitlines() if ": refused: " in line]
    assert [line.split(":")[0] for line in notes] == ["muon", "apollo_adamw"]
    assert "muon: refused: muon: this is a LoRA (PEFT) model" in notes[0]
    rows = {line.split()[1]: line for line in out.splitlines() if line.startswith("│ ")}
    assert "refused" in rows["muon"] and "refused" in rows["apollo_adamw"] and "refused" not in rows["adamw"]
