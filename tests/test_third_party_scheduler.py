"""A third-party scheduler plugin installed as a real distribution: discovered, selected, trained, resumed, drawn.

The plugin (``tests/scheduler_dist``, distribution ``optiplug-testhalflife``) is written only from
the public contract; its ``__init__.py`` is the example of docs/writing-a-plugin.md, verbatim.
It is pip-installed into a temporary directory, so nothing leaks into other tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import optiplug
import optiplug.app
from optiplug.testing import (
    TokenBlocks,
    install_distribution,
    installed_site,
    logged_losses,
    tiny_llama,
    training_args,
)

DIST = Path(__file__).parent / "scheduler_dist"
SOURCE = DIST / "src" / "optiplug_testhalflife" / "__init__.py"
DOCS = Path(__file__).parents[1] / "docs" / "writing-a-plugin.md"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    target = install_distribution(DIST, tmp_path_factory.mktemp("dist"))
    assert (target / "optiplug_testhalflife-0.1.0.dist-info" / "entry_points.txt").is_file()
    return target


@pytest.fixture
def installed(site, monkeypatch):
    with installed_site(site, monkeypatch, "optiplug_testhalflife"):
        yield site


def test_discovered_through_its_entry_point(installed):
    row = next(r for r in optiplug.list_schedulers() if r.name == "half_life")
    assert (row.plugin, row.entry.summary) == ("optiplug-testhalflife", "warmup, then half-life decay")
    info = {p.name: p for p in optiplug.registry.loaded_plugins()}["optiplug-testhalflife"]
    assert info.version == "0.1.0" and info.hooks == ("register_schedulers",)


def _trainer(path: Path, scheduler, **args):
    return optiplug.OptiTrainer(
        model=tiny_llama(),
        args=training_args(path, max_steps=8, **args),
        train_dataset=TokenBlocks(32, distinct=4),
        optimizer={"name": "adamw", "lr": 1e-2, "param_groups": [{"match": "embed_tokens", "lr_scale": 0.1}]},
        scheduler=scheduler,
    )


def test_selected_by_yaml_scales_every_group_and_resumes_exactly(installed, tmp_path):
    from optiplug_testhalflife import half_life_factor

    path = tmp_path / "run.yaml"
    path.write_text("scheduler:\n  name: half_life\n  warmup_steps: 2\n  half_life_ratio: 0.25\n")
    config = optiplug.app.load_config(path)
    assert type(config.scheduler).__module__ == "optiplug_testhalflife"
    full = _trainer(tmp_path / "full", config.scheduler, save_strategy="steps", save_steps=4)
    full.train()
    records = [r for r in full.state.log_history if "loss" in r]
    expected = [1e-2 * half_life_factor(step, 8, config.scheduler) for step in range(8)]
    assert [r["learning_rate"] for r in records] == pytest.approx(expected)
    assert [r["lr/embed_tokens"] for r in records] == pytest.approx([0.1 * rate for rate in expected])
    resumed = _trainer(tmp_path / "resumed", config.scheduler)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    after = {s: v for s, v in logged_losses(resumed).items() if s > 4}
    assert after == {s: v for s, v in logged_losses(full).items() if s > 4}


def test_optiplug_schedule_draws_it(site, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, "-m", "optiplug", "schedule", "half_life", "warmup_steps=10", "--steps", "100"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "half_life (warmup_steps=10), 100 steps: learning rate as a multiple of optimizer.lr"
    assert lines[4:6] == ["  step  25  0.678302", "  step  50  0.339151"]  # 0.5 ** ((step - 1 - 10) / 25)
    assert lines[-1] == "wrote schedule-half_life.png" and (tmp_path / "schedule-half_life.png").is_file()


def test_the_plugin_guide_shows_this_plugin_verbatim():
    text = DOCS.read_text()
    assert f"```python\n# src/optiplug_testhalflife/__init__.py\n{SOURCE.read_text()}```" in text
