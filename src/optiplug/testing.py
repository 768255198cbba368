"""Helpers for testing optiplug and its plugins: a tiny Llama, token blocks, temporary plugins.

Use them from a plugin's own tests::

    from optiplug.testing import tiny_llama, TokenBlocks, training_args, logged_losses

Loaded as a pytest plugin (the repository's root ``conftest.py`` has ``pytest_plugins = ["optiplug.testing"]``,
so every testpath gets it and a plugin needs no conftest of its own), it also sets the test environment once
(:data:`TEST_ENVIRONMENT`: one torch thread, offline, quiet) and provides the ``temp_plugin`` fixture and the
autouse ``one_thread`` fixture. pytest is only a test extra: this module imports it only when pytest is already
running, so the helpers work without it.

``install_distribution`` and ``installed_site`` test a plugin as a real pip-installed
distribution, found through its entry point.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TEST_ENVIRONMENT = {
    # Tiny-model tests run one torch thread per process: with pytest-xdist using both cores, extra threads only
    # contend (a tiny Llama step measured ~10 ms on one thread, ~1.5 s on two under load). Child processes
    # (torchrun, `python -m optiplug`) inherit the same environment.
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}
"""The environment the tests run in (values already set win)."""

VOCAB = 128
SEQ = 16


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 32):
    """A randomly initialised Llama-style causal LM, small enough for many training runs per test."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=SEQ * 2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


class TokenBlocks:
    """A map-style dataset of fixed random token blocks (labels = inputs)."""

    def __init__(self, n: int = 32, seed: int = 1, distinct: int | None = None):
        import torch

        g = torch.Generator().manual_seed(seed)
        base = torch.randint(0, VOCAB, (distinct or n, SEQ), generator=g)
        self.blocks = [base[i % base.shape[0]] for i in range(n)]

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        ids = self.blocks[i]
        return {"input_ids": ids, "labels": ids.clone()}


def training_args(output_dir, **overrides):
    """CPU TrainingArguments for short deterministic test runs (6 steps, batch 4, log every step)."""
    from transformers import TrainingArguments

    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        max_steps=6,
        per_device_train_batch_size=4,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def logged_losses(trainer) -> dict[int, float]:
    """``{step: loss}`` from the trainer's log history."""
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def _temp_plugin() -> Iterator:
    """Register plugin objects for one test: ``temp_plugin(obj, name)``; all are unregistered after."""
    from optiplug.registry import register_plugin, unregister_plugin

    names: list[str] = []

    def register(plugin, name: str):
        register_plugin(plugin, name)
        names.append(name)
        return plugin

    yield register
    for name in names:
        unregister_plugin(name)


def _one_thread() -> Iterator[None]:
    """Tiny models run fastest on one torch thread, and far faster than on two when the cores are busy."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


if sys.modules.get("pytest") is not None:  # loaded by pytest (pytest_plugins): the fixtures and the environment
    import pytest

    temp_plugin = pytest.fixture(_temp_plugin, name="temp_plugin")
    one_thread = pytest.fixture(_one_thread, name="one_thread", autouse=True, scope="module")

    def pytest_configure(config: Any) -> None:
        for key, value in TEST_ENVIRONMENT.items():
            os.environ.setdefault(key, value)


def install_distribution(source: Path, workdir: Path) -> Path:
    """pip-install the distribution at ``source`` into a fresh folder under ``workdir`` and return that folder.

    The source tree is copied first (build leftovers ignored), so the repository stays clean; nothing
    is installed into the running environment: put the folder on ``sys.path`` with :func:`installed_site`.
    """
    import shutil
    import subprocess
    import sys

    copy = workdir / "src" / source.name
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    target = workdir / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "--target", str(target), str(copy)], check=True)
    return target


@contextlib.contextmanager
def installed_site(site: Path, monkeypatch: Any, package: str) -> Iterator[Path]:
    """Plugins load with ``site`` (from :func:`install_distribution`) on ``sys.path``, every entry point allowed.

    On exit ``site`` leaves ``sys.path``, the modules of ``package`` are forgotten and the plugins load
    again without it. Only this block's own changes are undone (``monkeypatch``, the test's fixture, is
    not used: undoing it would undo every other patch of the test).
    """
    import pytest

    from optiplug.registry import reload_plugins

    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(site))
        patch.delenv("OPTIPLUG_LOAD_PLUGINS", raising=False)
        patch.delenv("OPTIPLUG_DISABLE_PLUGINS", raising=False)
        reload_plugins()
        try:
            yield site
        finally:
            patch.undo()
            for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
                del sys.modules[name]
            reload_plugins()
