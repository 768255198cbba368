"""A third-party plugin installed as a real distribution is discovered through its entry point and trains.

The plugin (``tests/plugin_dist``, distribution ``optiplug-testlion``) is written only from the
public contract. It is pip-installed into a temporary directory, so nothing leaks into the
environment of other tests.
"""

from __future__ import annotations

import json
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

DIST = Path(__file__).parent / "plugin_dist"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    target = install_distribution(DIST, tmp_path_factory.mktemp("dist"))
    assert (target / "optiplug_testlion-0.3.0.dist-info" / "entry_points.txt").is_file()
    return target


@pytest.fixture
def installed(site, monkeypatch):
    with installed_site(site, monkeypatch, "optiplug_testlion"):
        yield site


def test_discovered_through_its_entry_point(installed):
    row = next(r for r in optiplug.list_optimizers() if r.name == "lion")
    assert row.plugin == "optiplug-testlion"
    info = {p.name: p for p in optiplug.registry.loaded_plugins()}["optiplug-testlion"]
    assert info.version == "0.3.0" and info.hooks == ("register_optimizers",)


def test_selected_by_a_yaml_config_and_trains(installed, tmp_path):
    path = tmp_path / "lion.yaml"
    path.write_text("optimizer:\n  name: lion\n  lr: 0.003\n  weight_decay: 0.01\nscheduler: {name: constant}\n")
    config = optiplug.app.load_config(path)
    assert type(config.optimizer).__module__ == "optiplug_testlion"
    trainer = optiplug.OptiTrainer(
        model=tiny_llama(),
        args=training_args(tmp_path, max_steps=8),
        train_dataset=TokenBlocks(32, distinct=4),
        optimizer=config.optimizer,
        scheduler=config.scheduler,
    )
    trainer.train()
    assert type(trainer.optimizer.optimizer).__name__ == "Lion"
    losses = list(logged_losses(trainer).values())
    assert losses[-1] < losses[0]


def _cli(site: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "optiplug", *args], capture_output=True, text=True, env=env, cwd=cwd)


def test_cli_lists_and_shows_the_plugin(site):
    listed = _cli(site, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows["lion"]["plugin"] == "optiplug-testlion" and rows["lion"]["summary"] == "Lion (sign momentum)"
    shown = _cli(site, "show", "lion")
    assert shown.returncode == 0 and "lion  (optimizer, plugin optiplug-testlion)" in shown.stdout
    assert "betas: tuple[float, float] = (0.9, 0.99)" in shown.stdout


@pytest.mark.slow
def test_cli_trains_with_the_plugin(site, tmp_path):
    path = tmp_path / "lion.yaml"
    path.write_text(
        "optimizer: {name: lion, lr: 0.002}\n"
        f"training: {{max_steps: 4, output_dir: {tmp_path / 'out'}, per_device_train_batch_size: 4}}\n"
        "data: {block_size: 32, max_blocks: 64}\n"
    )
    run = _cli(site, "train", str(path))
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["optimizer"]["name"] == "lion"
