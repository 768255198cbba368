"""One `optiplug train` parses each section once, checks requirements once and runs the check once;
values are read by YAML 1.2 (``no`` is text for a text field, ``5e-1`` a number); the registry reloads clean."""

from __future__ import annotations

from collections import Counter
from typing import Literal

import pytest
from pydantic import Field

import optiplug
import optiplug.app
from optiplug import parsing
from optiplug.app.cli import main
from optiplug.app.config import load_config, resolve_config
from optiplug.entries import OptimizerEntry
from optiplug.registry import Registry, registry

FAST = [
    "data.block_size=16",
    "data.max_blocks=16",
    "training.max_steps=2",
    "training.per_device_train_batch_size=4",
    "training.disable_tqdm=true",
]


class CountedConfig(optiplug.AdamFields):
    name: Literal["counted_adamw"] = "counted_adamw"
    mode: Literal["on", "off", "no"] = "on"  # text choices that YAML 1.1 would read as booleans
    verbose: bool = False


CALLS: Counter[str] = Counter()


def _check(ctx, cfg):
    CALLS["check"] += 1


def _build(ctx, cfg):
    import torch

    skeleton = any(p.is_meta for p in ctx.model.parameters())  # validate's build, also run by train
    CALLS["build on the skeleton" if skeleton else "build"] += 1
    return torch.optim.AdamW(ctx.param_groups(cfg.weight_decay), lr=cfg.lr)


class CountedPlugin:
    @optiplug.hookimpl
    def register_optimizers(self, register):
        register(OptimizerEntry(config=CountedConfig, build=_build, check=_check, requires=("torch",)))


@pytest.fixture
def counted(temp_plugin, monkeypatch):
    temp_plugin(CountedPlugin(), "counted-plugin")
    CALLS.clear()
    validate, requires = parsing.validate, OptimizerEntry.check_requires

    def counting_validate(tables, kind, value):
        CALLS[f"parse {kind}"] += 1
        return validate(tables, kind, value)

    def counting_requires(self):
        CALLS["requires"] += 1
        return requires(self)

    monkeypatch.setattr(parsing, "validate", counting_validate)  # the one place a config is validated
    monkeypatch.setattr(OptimizerEntry, "check_requires", counting_requires)
    return CALLS


# Built once on the weights, and once before on the model's skeleton (no weights): what `optiplug validate` checks.
ONCE = {"parse optimizer": 1, "parse scheduler": 1, "requires": 1, "check": 1, "build": 1, "build on the skeleton": 1}


def test_one_train_command_parses_checks_and_builds_once(counted, tmp_path):
    with pytest.raises(SystemExit) as done:
        main(["train", *FAST, "optimizer.name=counted_adamw", f"training.output_dir={tmp_path / 'out'}"])
    assert done.value.code == 0
    assert (tmp_path / "out" / "summary.json").is_file()
    assert dict(counted) == ONCE


def test_python_api_train_parses_checks_and_builds_once(counted, tmp_path):
    optiplug.app.train(None, [*FAST, "optimizer.name=counted_adamw", f"training.output_dir={tmp_path / 'out'}"])
    assert dict(counted) == ONCE


# ---- values: YAML 1.2, on the command line and in files -------------------------------------


def test_text_choices_keep_their_text_on_the_command_line(temp_plugin):
    temp_plugin(CountedPlugin(), "counted-plugin")
    config = load_config(None, ["optimizer.name=counted_adamw", "optimizer.mode=no", "training.save_strategy=no"])
    assert config.optimizer.mode == "no"
    assert config.training["save_strategy"] == "no"
    assert load_config(None, ["optimizer.name=counted_adamw", "optimizer.mode=off"]).optimizer.mode == "off"


def test_text_choices_keep_their_text_in_a_yaml_file(temp_plugin, tmp_path):
    temp_plugin(CountedPlugin(), "counted-plugin")
    path = tmp_path / "run.yaml"
    path.write_text("optimizer: {name: counted_adamw, mode: on}\ntraining: {save_strategy: no, run_name: 1e3}\n")
    config = load_config(path)
    assert config.optimizer.mode == "on"
    assert config.training["save_strategy"] == "no"
    from optiplug.app.validation import training_arguments

    args = training_arguments(config)
    assert args.save_strategy == "no" and args.run_name == "1e3"  # a text field gets the text typed


def test_a_number_for_a_text_field_is_the_text_typed_in_yaml_and_pythons_text_from_python():
    """The contract fits a number to a text field with ``str``; a YAML number's ``str`` is its text as typed."""
    from optiplug.app.validation import training_arguments

    typed = load_config(None, ["training.run_name=1e3", "training.max_grad_norm=5e-1"])
    args = training_arguments(typed)
    assert args.run_name == "1e3"
    assert type(args.max_grad_norm) is float and str(args.max_grad_norm) == "0.5"  # Python's own number past it
    assert training_arguments(optiplug.app.RunConfig(training={"run_name": 1e3})).run_name == "1000.0"
    rule = load_config(None, ["optimizer.param_groups=[{match: bias, name: 1e3}]"]).optimizer.param_groups[0]
    assert rule.name == "1e3"
    python_rule = optiplug.parse_optimizer("adamw", param_groups=[{"match": "bias", "name": 1e3}]).param_groups[0]
    assert python_rule.name == "1000.0"


@pytest.mark.parametrize(("text", "expected"), [("true", True), ("false", False), ("yes", True), ("off", False)])
def test_booleans_still_parse_for_boolean_fields(temp_plugin, text, expected):
    temp_plugin(CountedPlugin(), "counted-plugin")
    config = load_config(None, ["optimizer.name=counted_adamw", f"optimizer.verbose={text}"])
    assert config.optimizer.verbose is expected


def test_numbers_follow_yaml_1_2():
    config = load_config(None, ["optimizer.lr=5e-1", "training.max_grad_norm=5e-1", "data.block_size=010"])
    assert config.optimizer.lr == 0.5
    assert config.training["max_grad_norm"] == 0.5 and isinstance(config.training["max_grad_norm"], float)
    assert config.data.block_size == 10  # decimal, not YAML 1.1's octal


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.lr=true", "optimizer.lr: expected a number, got the boolean true"),
        ("optimizer.lr=.inf", "optimizer.lr: Input should be a finite number (got inf)"),
        ("data.block_size=false", "data.block_size: expected a number, got the boolean false"),
    ],
)
def test_numbers_must_be_numbers(override, message):
    with pytest.raises(optiplug.ConfigError) as error:
        load_config(None, [override])
    assert str(error.value) == message


# ---- estimate honours overrides on a RunConfig; reload starts clean --------------------------


def test_overrides_apply_to_a_run_config_object():
    base = load_config(None, ["optimizer.lr=0.01"])
    assert resolve_config(base, ["optimizer.lr=0.02"]).optimizer.lr == 0.02
    from optiplug.app.estimate import estimate

    plain = estimate(base)[0]
    halved = estimate(base, overrides=["model.dtype=bfloat16"])[0]
    assert halved.weights_bytes * 2 == plain.weights_bytes


def test_reload_reads_the_deny_list_again(monkeypatch):
    monkeypatch.setenv("OPTIPLUG_DISABLE_PLUGINS", "optiplug-badam")
    fresh = Registry()
    assert "badam" not in fresh.names("optimizer")
    assert fresh.plugin_manager.is_blocked("optiplug-badam")  # pluggy's own blocking
    monkeypatch.delenv("OPTIPLUG_DISABLE_PLUGINS")
    fresh.reload()
    assert "badam" in fresh.names("optimizer")
    assert not fresh.plugin_manager.is_blocked("optiplug-badam")


def test_the_default_names_come_from_the_default_plugin():
    assert registry.default_name("optimizer") == "adamw" and registry.default_name("scheduler") == "cosine"
    assert optiplug.parse_optimizer(None).name == "adamw"


class _Unused(optiplug.OptimizerConfig):
    name: Literal["unused"] = "unused"
    x: int = Field(1)
