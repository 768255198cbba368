"""Configs: YAML, overrides, discriminated unions, one source of truth, and the exact error messages."""

from __future__ import annotations

import pytest

import optiplug
import optiplug.app
from optiplug.app.config import apply_overrides, load_config, run_config_schema
from optiplug.registry import parse_optimizer


def write(tmp_path, text: str, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_the_default_plugin():
    config = load_config()
    assert config.optimizer.name == "adamw" and config.scheduler.name == "cosine"
    assert config.model.name_or_path == "embedded" and config.finetuning.type == "full"


def test_yaml_selects_a_registered_optimizer(tmp_path):
    path = write(
        tmp_path, "optimizer: {name: sgd, lr: 0.05, momentum: 0.5}\nscheduler: {name: linear, warmup_ratio: 0.1}\n"
    )
    config = load_config(path)
    assert type(config.optimizer).__name__ == "SGDConfig"
    assert config.optimizer.lr == 0.05 and config.optimizer.momentum == 0.5
    assert config.scheduler.warmup_ratio == 0.1


def test_override_values_are_yaml_scalars(tmp_path):
    path = write(tmp_path, "optimizer: {name: adamw}\ntraining: {max_steps: 10}\n")
    config = load_config(
        path,
        [
            "optimizer.lr=3e-4",
            "optimizer.betas=[0.9, 0.95]",
            "training.bf16=false",
            "training.output_dir=out dir",
            "data.block_size=64",
        ],
    )
    assert config.optimizer.lr == 3e-4 and config.optimizer.betas == (0.9, 0.95)
    assert config.training == {"max_steps": 10, "bf16": False, "output_dir": "out dir"}
    assert config.data.block_size == 64


def test_overriding_the_name_starts_the_section_afresh(tmp_path):
    path = write(tmp_path, "optimizer: {name: adamw, lr: 0.003, amsgrad: true}\n")
    config = load_config(path, ["optimizer.name=sgd"])
    assert config.optimizer == parse_optimizer("sgd")  # amsgrad and lr did not leak into sgd
    config = load_config(path, ["optimizer.lr=0.2", "optimizer.name=sgd"])  # same command line: kept
    assert config.optimizer.name == "sgd" and config.optimizer.lr == 0.2
    config = load_config(path, ["optimizer.name=adamw"])  # the same name keeps the section
    assert config.optimizer.amsgrad is True


def test_override_on_an_absent_section_configures_the_default():
    config = load_config(None, ["optimizer.lr=0.01", "scheduler.warmup_steps=5"])
    assert config.optimizer.name == "adamw" and config.optimizer.lr == 0.01
    assert config.scheduler.name == "cosine" and config.scheduler.warmup_steps == 5


def test_configs_are_frozen_and_forbid_extra_fields():
    config = parse_optimizer("adamw")
    import pydantic

    with pytest.raises(pydantic.ValidationError, match="frozen"):
        config.lr = 1.0  # type: ignore[misc]
    with pytest.raises(optiplug.ConfigError) as info:
        parse_optimizer({"name": "adamw", "lrr": 1.0})
    assert str(info.value) == "optimizer.lrr: unknown field; check the spelling (`optiplug show NAME` lists the fields)"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optimizer.name=adamww"], "unknown optimizer 'adamww'. Did you mean 'adamw'"),
        (["scheduler.name=cosin"], "unknown scheduler 'cosin'. Did you mean 'cosine'"),
        (["optimizer.lr=-1"], "optimizer.lr: Input should be greater than 0 (got -1)"),
        (["optimizer.betas=[0.9, 1.5]"], "optimizer.betas.1: Input should be less than 1 (got 1.5)"),
        (
            ["optimizer.lr=fast"],
            "optimizer.lr: Input should be a valid number, unable to parse string as a number (got 'fast')",
        ),
        (
            ["scheduler.warmup_steps=3", "scheduler.warmup_ratio=0.1"],
            "scheduler: set warmup_steps or warmup_ratio, not both",
        ),
        (["data.block_size=0"], "data.block_size: Input should be greater than 0 (got 0)"),
        (["model.dtype=float8"], "model.dtype: Input should be 'float32', 'bfloat16' or 'float16' (got 'float8')"),
        (
            ["finetuning.type=freeze"],
            "finetuning: type 'freeze' needs 'trainable': the parameter-name patterns to train",
        ),
        (["trainin.max_steps=3"], "trainin: unknown field; check the spelling"),
        (
            ["training.learning_rate=0.5"],
            "training.learning_rate=0.5 conflicts with optimizer.lr=0.001: set it in the optimizer section only",
        ),
        (
            ["optimizer.name=adamw", "training.optim=sgd"],
            "training.optim='sgd' selects optimizer 'sgd' but the optimizer section is 'adamw': remove training.optim "
            "or the optimizer section",
        ),
        (
            ["scheduler.name=cosine", "training.lr_scheduler_type=linear"],
            "training.lr_scheduler_type='linear' selects scheduler 'linear' but the scheduler section is 'cosine': "
            "remove training.lr_scheduler_type or the scheduler section",
        ),
        (
            ["optimizer.name=sgd", "training.adam_beta1=0.8"],
            "training.adam_beta1: optimizer 'sgd' has no betas[0]; remove it from the training section",
        ),
        (["optimizer.lr"], "override 'optimizer.lr': expected KEY=VALUE with a dotted key, e.g. optimizer.lr=3e-4"),
    ],
)
def test_bad_values_get_one_clear_message(overrides, message):
    with pytest.raises(optiplug.ConfigError) as info:
        load_config(None, overrides)
    assert str(info.value).startswith(message)


def test_an_agreeing_training_value_is_accepted():
    config = load_config(None, ["optimizer.lr=0.002", "training.learning_rate=0.002"])
    assert config.optimizer.lr == 0.002


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "- a\n- b\n",
            "must be a mapping of sections (model, data, training, optimizer, scheduler, finetuning), not a list",
        ),
        ("optimizer: {name: adamw\n", "is not valid YAML at line 2, column 1"),
        ("just a string", "must be a mapping of sections"),
        ("!!python/object/apply:os.system ['echo pwned']\n", "is not valid YAML"),
    ],
)
def test_bad_yaml_files(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(optiplug.ConfigError) as info:
        load_config(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(optiplug.ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert str(info.value) == f"config file '{tmp_path / 'nope.yaml'}' does not exist"


def test_no_import_path_escape_hatch():
    with pytest.raises(optiplug.UnknownNameError):
        load_config(None, ["optimizer.name=torch.optim.SGD"])
    with pytest.raises(optiplug.ConfigError, match=r"optimizer\._component_: unknown field"):
        load_config(None, ["optimizer._component_=torch.optim.SGD"])


def test_apply_overrides_does_not_mutate_its_input():
    data = {"optimizer": {"name": "adamw", "lr": 1.0}}
    out = apply_overrides(data, ["optimizer.lr=2", "training.max_steps=3"])
    assert data == {"optimizer": {"name": "adamw", "lr": 1.0}}
    assert out == {"optimizer": {"name": "adamw", "lr": 2}, "training": {"max_steps": 3}}


def test_config_objects_and_dicts_round_trip():
    config = load_config(None, ["optimizer.name=rmsprop", "optimizer.centered=true"])
    again = optiplug.app.RunConfig.model_validate(config.model_dump())
    assert again == config and type(again.optimizer).__name__ == "RMSpropConfig"


def test_schema_lists_every_registered_config():
    schema = run_config_schema()
    defs = schema["$defs"]
    for row in optiplug.list_optimizers():
        assert row.entry.config.__name__ in defs
    optimizer = schema["properties"]["optimizer"]
    assert optimizer["discriminator"]["propertyName"] == "name"
    assert "adamw" in optimizer["discriminator"]["mapping"]
