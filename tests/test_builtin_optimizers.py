"""The default plugin's torch.optim optimizers: each built as its hand-written factory built it up to 0.1, the kernel
choice (``kernel``, formerly ``implementation``), and ``optiplug.OptimizerClass``, the declaration they are built from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import optiplug
from optiplug.context import BuildContext
from optiplug.testing import tiny_llama

# Each built-in with values off its defaults, and the call its build_* function made up to 0.1 (the groups from
# ctx.param_groups(cfg.weight_decay), so the weight decay is in the groups, not an argument).
AS_WRITTEN = {
    "adamw": (
        {"lr": 3e-4, "betas": (0.8, 0.9), "eps": 1e-6, "weight_decay": 0.1, "amsgrad": True, "kernel": "foreach"},
        "AdamW",
        {"lr": 3e-4, "betas": (0.8, 0.9), "eps": 1e-6, "amsgrad": True, "foreach": True, "fused": False},
    ),
    "adam": (
        {"lr": 3e-4, "betas": (0.8, 0.9), "eps": 1e-6, "weight_decay": 0.1, "amsgrad": True},
        "Adam",
        {"lr": 3e-4, "betas": (0.8, 0.9), "eps": 1e-6, "amsgrad": True, "fused": True},
    ),
    "sgd": (
        {"lr": 0.1, "momentum": 0.5, "dampening": 0.0, "nesterov": True, "weight_decay": 0.01},
        "SGD",
        {"lr": 0.1, "momentum": 0.5, "dampening": 0.0, "nesterov": True},
    ),
    "adagrad": (
        {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1, "eps": 1e-8, "weight_decay": 0.01},
        "Adagrad",
        {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1, "eps": 1e-8},
    ),
    "rmsprop": (
        {"lr": 0.1, "alpha": 0.9, "eps": 1e-6, "momentum": 0.5, "centered": True, "weight_decay": 0.01},
        "RMSprop",
        {"lr": 0.1, "alpha": 0.9, "eps": 1e-6, "momentum": 0.5, "centered": True},
    ),
    "radam": (
        {"lr": 0.1, "betas": (0.8, 0.9), "eps": 1e-6, "weight_decay": 0.01, "decoupled_weight_decay": True},
        "RAdam",
        {"lr": 0.1, "betas": (0.8, 0.9), "eps": 1e-6, "decoupled_weight_decay": True},
    ),
    "nadam": (
        {"lr": 0.1, "betas": (0.8, 0.9), "eps": 1e-6, "weight_decay": 0.01, "momentum_decay": 0.01},
        "NAdam",
        {"lr": 0.1, "betas": (0.8, 0.9), "eps": 1e-6, "momentum_decay": 0.01, "decoupled_weight_decay": False},
    ),
    "adamax": (
        {"lr": 0.1, "betas": (0.8, 0.9), "eps": 1e-6, "weight_decay": 0.01},
        "Adamax",
        {"lr": 0.1, "betas": (0.8, 0.9), "eps": 1e-6},
    ),
}


def test_every_builtin_is_in_the_table():
    assert sorted(row.name for row in optiplug.list_optimizers() if row.plugin == "optiplug:optimizers") == sorted(
        AS_WRITTEN
    )


@pytest.mark.parametrize("name", sorted(AS_WRITTEN))
def test_each_builtin_builds_what_its_factory_built(name):
    """Same class, same defaults, same groups: the same steps, so the same numbers as before the table."""
    import torch

    values, cls, arguments = AS_WRITTEN[name]
    model = tiny_llama()
    built = optiplug.build_optimizer(model, name, **values)
    cfg = optiplug.parse_optimizer(name, **values)
    written = getattr(torch.optim, cls)(BuildContext(model=model).param_groups(cfg.weight_decay), **arguments)
    assert type(built) is type(written)
    assert built.defaults == written.defaults
    assert [{**g, "params": [id(p) for p in g["params"]]} for g in built.param_groups] == [
        {**g, "params": [id(p) for p in g["params"]]} for g in written.param_groups
    ]
    assert {g["weight_decay"] for g in built.param_groups} == {0.0, values["weight_decay"]}


@pytest.mark.parametrize(
    ("kernel", "expected"),
    [("auto", (True, None)), ("fused", (True, None)), ("foreach", (False, True)), ("for-loop", (False, False))],
)
@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_the_kernel_field_picks_torchs_kernel(name, kernel, expected):
    optimizer = optiplug.build_optimizer(tiny_llama(), name, kernel=kernel)
    assert (optimizer.defaults["fused"], optimizer.defaults["foreach"]) == expected


def test_implementation_is_read_as_kernel():
    """Configs written up to 0.1 (user YAMLs, checkpoints' optiplug_config.json) name the field ``implementation``."""
    assert optiplug.parse_optimizer({"name": "adamw", "implementation": "foreach"}).kernel == "foreach"
    assert optiplug.parse_optimizer({"name": "adam", "implementation": "for-loop"}).kernel == "for-loop"
    assert optiplug.parse_optimizer({"name": "adamw", "implementation": "fused", "kernel": "fused"}).kernel == "fused"
    assert optiplug.parse_optimizer("adamw_torch_fused").kernel == "fused"
    optimizer = optiplug.build_optimizer(tiny_llama(), "adamw", implementation="foreach")
    assert (optimizer.defaults["fused"], optimizer.defaults["foreach"]) == (False, True)
    assert "implementation" not in optiplug.parse_optimizer({"name": "adamw", "implementation": "fused"}).model_dump()


def test_implementation_and_kernel_that_disagree_are_refused():
    with pytest.raises(optiplug.ConfigError, match="implementation is the old name of kernel: set kernel only"):
        optiplug.parse_optimizer({"name": "adamw", "implementation": "foreach", "kernel": "fused"})
    with pytest.raises(optiplug.ConfigError, match="implementation is the old name of kernel"):
        optiplug.parse_optimizer({"name": "adamw_torch_fused", "implementation": "foreach"})


def test_an_old_checkpoint_record_with_another_implementation_is_still_a_difference(tmp_path):
    """Reading ``implementation`` as ``kernel`` in a checkpoint's record hides no real change of kernel."""
    from optiplug.app.safety import check_checkpoint

    old = Path(__file__).parent / "fixtures" / "old_checkpoints" / "adamw" / "checkpoint-3"
    checkpoint = tmp_path / "checkpoint-3"
    shutil.copytree(old, checkpoint)
    record = json.loads((checkpoint / "optiplug_config.json").read_text())
    assert record["optimizer"]["implementation"] == "auto"  # the old name, as written before the rename
    given = {"name": "adamw", "lr": 0.01, "weight_decay": 0.01}
    scheduler = optiplug.parse_scheduler({"name": "cosine", "warmup_steps": 1})
    check_checkpoint(str(checkpoint), optiplug.parse_optimizer(given), scheduler, engine=False)
    with pytest.raises(optiplug.CheckpointError, match=r"optimizer\.kernel='foreach' \(checkpoint: 'auto'\)"):
        check_checkpoint(str(checkpoint), optiplug.parse_optimizer({**given, "kernel": "foreach"}), scheduler, False)


def _declared(temp_plugin, build: optiplug.OptimizerClass) -> None:
    """Registers ``build`` as the entry ``declared`` (an AdamW-like config)."""
    import types
    from typing import Literal

    class DeclaredConfig(optiplug.AdamFields):
        name: Literal["declared"] = "declared"
        kernel: optiplug.Kernel = "auto"

    plugin = types.ModuleType("declared_plugin")
    plugin.register_optimizers = optiplug.hookimpl(
        lambda register: register(optiplug.OptimizerEntry(config=DeclaredConfig, build=build))
    )
    temp_plugin(plugin, "declared-plugin")


def test_an_optimizer_class_passes_the_fields_and_the_computed_arguments(temp_plugin):
    seen = []

    def computed(cfg, groups):
        seen.append((cfg.kernel, sum(len(group["params"]) for group in groups)))
        return {"foreach": True}

    _declared(temp_plugin, optiplug.OptimizerClass("torch.optim.Adam", ("betas",), computed=computed))
    model = tiny_llama()
    optimizer = optiplug.build_optimizer(model, "declared", lr=0.5, betas=(0.5, 0.6), eps=0.1, weight_decay=0.2)
    assert (optimizer.defaults["lr"], optimizer.defaults["betas"], optimizer.defaults["foreach"]) == (
        0.5,
        (0.5, 0.6),
        True,
    )
    assert optimizer.defaults["eps"] == 1e-8  # not in fields: torch's default, not the config's
    assert sorted({group["weight_decay"] for group in optimizer.param_groups}) == [0.0, 0.2]
    assert seen == [("auto", len(list(model.parameters())))]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            optiplug.OptimizerClass("torch.optim.AdamW", ("betaz",)),
            "optimizer .declared.: OptimizerClass.+ passes betaz, which its config DeclaredConfig has no field",
        ),
        (optiplug.OptimizerClass("torch.optim.NoSuchAdam"), "torch.optim has no class 'NoSuchAdam'"),
    ],
)
def test_an_optimizer_class_that_does_not_fit_says_what(temp_plugin, build, message):
    _declared(temp_plugin, build)
    with pytest.raises(optiplug.PluginError, match=message):
        optiplug.build_optimizer(tiny_llama(), "declared")


def test_an_optimizer_class_of_a_package_not_installed_is_the_install_hint(temp_plugin):
    _declared(temp_plugin, optiplug.OptimizerClass("not_installed_optimizers.Lion"))
    with pytest.raises(optiplug.MissingDependencyError, match="not_installed_optimizers"):
        optiplug.build_optimizer(tiny_llama(), "declared")


def test_an_optimizer_class_is_declared_with_a_class_path_and_a_tuple_of_fields():
    with pytest.raises(optiplug.PluginError, match=r"'package\.module\.Class', got 'AdamW'"):
        optiplug.OptimizerClass("AdamW")
    with pytest.raises(optiplug.PluginError, match="fields must be a tuple of field names, got 'betas'"):
        optiplug.OptimizerClass("torch.optim.AdamW", "betas")  # type: ignore[arg-type]
    assert optiplug.OptimizerClass("torch.optim.AdamW", ["betas"]).fields == ("betas",)  # type: ignore[arg-type]
