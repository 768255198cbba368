"""Docs and examples stay true: every hook documented, the plugin guide's code runs, every example is valid."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

import optiplug
import optiplug.app
from optiplug import hookspecs

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def hook_names() -> list[str]:
    return sorted(n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "optiplug_spec"))


def test_every_hookspec_is_documented():
    text = (ROOT / "docs" / "hooks.md").read_text()
    documented = set(re.findall(r"^## (\w+)$", text, flags=re.M))
    assert documented == set(hook_names())
    for name in hook_names():
        assert getattr(hookspecs, name).__doc__, f"hookspec {name} has no docstring"


def test_every_entry_field_is_documented():
    text = (ROOT / "docs" / "hooks.md").read_text()
    import dataclasses

    for field in dataclasses.fields(optiplug.OptimizerEntry):
        assert f"| `{field.name}` |" in text, field.name


def test_the_readme_links_every_plugin():
    """The README's plugin list names each folder of plugins/ (it was missing five of thirteen)."""
    readme = (ROOT / "README.md").read_text()
    linked = set(re.findall(r"\]\(plugins/(\w+)/README\.md\)", readme))
    assert linked == {path.parent.name for path in (ROOT / "plugins").glob("*/README.md")}


def test_the_plugin_guide_code_registers_and_builds(temp_plugin, tmp_path, monkeypatch):
    text = (ROOT / "docs" / "writing-a-plugin.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    plugin_source = next(b for b in blocks if "register_optimizers" in b)
    package = tmp_path / "my_lion"
    package.mkdir()
    (package / "__init__.py").write_text(plugin_source)
    optim_source = (ROOT / "tests" / "plugin_dist" / "src" / "optiplug_testlion" / "optim.py").read_text()
    (package / "optim.py").write_text(optim_source)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    module = importlib.import_module("my_lion")
    temp_plugin(module, "my-lion")
    from optiplug.testing import tiny_llama

    optimizer = optiplug.build_optimizer(tiny_llama(), "lion", lr=3e-4)
    assert type(optimizer).__name__ == "Lion" and optimizer.param_groups[0]["lr"] == 3e-4
    test_source = next(b for b in blocks if "def test_lion_trains" in b)
    namespace: dict = {}
    exec(compile(test_source, "writing-a-plugin.md", "exec"), namespace)
    namespace["test_lion_trains"](tmp_path / "run")


def _guide_plugin(temp_plugin, marker: str, module: str) -> None:
    """Registers the plugin guide's code block that holds ``marker`` as the plugin module ``module``."""
    import types

    text = (ROOT / "docs" / "writing-a-plugin.md").read_text()
    source = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if marker in b)
    plugin = types.ModuleType(module)
    exec(compile(source, "writing-a-plugin.md", "exec", dont_inherit=True), plugin.__dict__)
    temp_plugin(plugin, module.replace("_", "-"))


def test_the_helpers_example_registers_trains_and_estimates_exactly(temp_plugin):
    import torch

    _guide_plugin(temp_plugin, "AMSGradConfig", "my_amsgrad")
    from optiplug.context import ParamShape
    from optiplug.testing import tiny_llama

    with pytest.raises(optiplug.ConfigError, match=r"optimizer\.betas\.0: Input should be less than 1"):
        optiplug.parse_optimizer({"name": "my_amsgrad", "betas": [1.0, 0.9]})
    model = tiny_llama()
    optimizer = optiplug.build_optimizer(model, "my_amsgrad", weight_decay=0.1)
    assert optimizer.defaults["amsgrad"] and optimizer.defaults["fused"]  # the kernel chooser picked fused on CPU
    model(input_ids=torch.arange(8)[None], labels=torch.arange(8)[None]).loss.backward()
    optimizer.step()
    entry = optiplug.get_entry("my_amsgrad")
    cfg = optiplug.parse_optimizer("my_amsgrad")
    assert entry.state_bytes(ParamShape.of_model(model), cfg) == optiplug.optimizer_state_bytes(optimizer)


def test_the_class_declaration_example_registers_builds_and_estimates_exactly(temp_plugin):
    import torch

    _guide_plugin(temp_plugin, "MyAdamWConfig", "my_adamw")
    from optiplug.context import ParamShape
    from optiplug.testing import tiny_llama

    model = tiny_llama()
    optimizer = optiplug.build_optimizer(model, "my_adamw")
    assert type(optimizer) is torch.optim.AdamW
    assert (optimizer.defaults["lr"], optimizer.defaults["betas"], optimizer.defaults["fused"]) == (
        6e-4,
        (0.9, 0.95),
        True,
    )
    assert sorted({group["weight_decay"] for group in optimizer.param_groups}) == [0.0, 0.1]  # decay and no-decay
    optimizer = optiplug.build_optimizer(model, "my_adamw", amsgrad=True, kernel="foreach")
    assert (optimizer.defaults["amsgrad"], optimizer.defaults["foreach"], optimizer.defaults["fused"]) == (
        True,
        True,
        False,
    )
    model(input_ids=torch.arange(8)[None], labels=torch.arange(8)[None]).loss.backward()
    optimizer.step()
    cfg = optiplug.parse_optimizer("my_adamw", amsgrad=True)
    entry = optiplug.get_entry("my_adamw")
    assert entry.state_bytes(ParamShape.of_model(model), cfg) == optiplug.optimizer_state_bytes(optimizer)


def test_every_registered_optimizer_has_a_runnable_example():
    selected = {}
    for path in EXAMPLES:
        data = yaml.safe_load(path.read_text())
        optimizer = data.get("optimizer")
        name = optimizer.get("name") if isinstance(optimizer, dict) else optimizer
        selected.setdefault(name, path.name)
    # optiplug-pytorch-optimizer's catalogue has examples for po_lion and po_muon; any other po_ name runs with
    # examples/pytorch-optimizer-lion.yaml optimizer.name=po_... (its README says so)
    rows = [r for r in optiplug.list_optimizers() if r.plugin != "optiplug-pytorch-optimizer"]
    missing = [row.name for row in rows if row.name not in selected]
    assert not missing, f"no example in examples/ selects: {missing}"


@pytest.fixture
def beside_examples(tmp_path_factory, monkeypatch):
    """A fresh working directory where ``examples/`` resolves (the examples name files relative to the
    repository's root, where they run as-is) and ``outputs/`` holds no earlier run."""
    cwd = tmp_path_factory.mktemp("beside-examples")
    (cwd / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(cwd)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_is_valid(path, beside_examples):
    config = optiplug.app.load_config(path)
    from optiplug.app.validation import check_training_section

    check_training_section(config)
    assert config.training.get("output_dir", "").startswith("outputs/")


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_trains(path, tmp_path, beside_examples):
    config = optiplug.app.load_config(path)
    if {"fsdp", "deepspeed"} & set(config.training):
        pytest.skip("needs a launcher: trained under torchrun/accelerate by tests/test_distributed.py")
    entry = optiplug.get_entry(config.optimizer.name)
    try:
        entry.check_requires()
    except optiplug.MissingDependencyError as error:
        pytest.skip(str(error))
    # 3 steps cannot hold the examples' 10-step warmups (refused: the rate would never reach optimizer.lr)
    if "lr_scheduler_type:" in path.read_text():  # transformers' names: the warmup is an argument
        shorter = ["training.warmup_steps=1"]
    elif config.scheduler is not None and getattr(config.scheduler, "warmup_steps", 0):
        shorter = ["scheduler.warmup_steps=1"]
    else:
        shorter = []
    result = optiplug.app.train(
        path,
        [
            f"training.output_dir={tmp_path}",
            "training.max_steps=3",
            "training.logging_steps=1",
            "data.max_blocks=48",
            "data.block_size=64",
            *shorter,
        ],
    )
    assert result.summary["steps"] == 3
