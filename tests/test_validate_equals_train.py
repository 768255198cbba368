"""`optiplug validate` runs every check `optiplug train` runs before its first step: same refusal, same line.

The checks run through one function (``optiplug.factory.check_optimizer``) whichever way a run starts, and
``validate`` also builds the optimizer and the scheduler on the model's skeleton (no weights), so an
optimizer's own argument checks and the scheduler's lengths are found before anything is loaded or written.
"""

from __future__ import annotations

from typing import Literal

import pytest
import yaml

import optiplug
from optiplug.app.testing import run_cli, tiny_run_config, validate_and_train
from optiplug.testing import tiny_llama


def _groups(*rules: dict) -> str:
    return "optimizer.param_groups=" + yaml.safe_dump(list(rules), default_flow_style=True).strip()


CASES = {
    "per-group betas out of range": (
        [_groups({"match": "norm", "betas": [2.0, 0.9]})],
        "optimizer.param_groups[0].betas.0: Input should be less than 1 (got 2.0)",
    ),
    "per-group betas with one value": (
        [_groups({"match": "norm", "betas": [0.5]})],
        "optimizer.param_groups[0].betas.1: required field is missing",
    ),
    "per-group option adamw does not take": (
        [_groups({"match": "norm", "momentum": 0.9})],
        "optimizer.param_groups[0].momentum: optimizer 'adamw' takes no per-group option 'momentum' (it takes: "
        "amsgrad, betas, decoupled_weight_decay, eps, lr, maximize, weight_decay)",
    ),
    "WSD longer than the run": (
        ["scheduler.name=warmup_stable_decay", "scheduler.warmup_steps=5", "scheduler.decay_steps=5"],
        "scheduler 'warmup_stable_decay': warmup (5) and decay (5) steps exceed the run's 2 steps: "
        "shorten them or train longer",
    ),
    "evaluation without evaluation data": (
        ["training.eval_strategy=steps"],
        "training.eval_strategy='steps' needs evaluation data: hold out a share of the corpus with "
        "data.eval_ratio (e.g. 0.05), or give held-out text in data.eval_path",
    ),
    "a schedule that follows the evaluation loss, without evaluation": (
        ["scheduler.name=reduce_lr_on_plateau"],
        "scheduler 'reduce_lr_on_plateau' changes the rate only after an evaluation, and eval_strategy is 'no': the "
        "rate would never change; evaluate during training (an evaluation dataset and eval_strategy 'steps'), or "
        "choose another scheduler",
    ),
    "push to the hub": (
        ["training.push_to_hub=true"],
        "training.push_to_hub: a run never uploads (it must not need the network); remove it, and upload the "
        "output directory when the run has finished (`hf upload REPO OUTPUT_DIR`)",
    ),
    "report to an integration that is not installed": (
        ["training.report_to=neptune"],
        "training.report_to: 'neptune' is not available here (it needs its package): pip install neptune; "
        "or set training.report_to=none",
    ),
    "report to an integration transformers does not know": (
        ["training.report_to=wandbb"],
        None,  # the message lists transformers' integrations: checked by its start
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_validate_and_train_refuse_with_the_same_line(tmp_path, case):
    overrides, expected = CASES[case]
    if case.startswith("report to an integration that is not"):
        pytest.importorskip("transformers").integrations.is_neptune_available() and pytest.fail("neptune installed")
    (code, validated), (train_code, trained) = validate_and_train(tmp_path, *overrides)
    dry_code, _, dry = run_cli("train", str(tmp_path / "run.yaml"), *overrides, "--dry-run")
    assert code == train_code == dry_code == 1
    assert validated == trained == dry  # the same refusal, from the same check
    assert validated.count("\n") == 1  # one line
    if expected is None:
        assert validated.startswith("optiplug: training.report_to: unknown integration 'wandbb' (transformers knows:")
    else:
        assert validated == f"optiplug: {expected}\n"
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_validate_groups_and_plain_validate_agree(tmp_path):
    momentum = _groups({"match": "norm", "momentum": 0.9})
    (_, plain), _ = validate_and_train(tmp_path, momentum)
    code, _, grouped = run_cli("validate", str(tiny_run_config(tmp_path)), momentum, "--groups")
    assert code == 1 and grouped == plain


def test_a_run_whose_length_comes_from_the_data_says_which_check_waits_for_it(tmp_path):
    config = tiny_run_config(tmp_path)
    code, out, _ = run_cli("validate", str(config), "training.max_steps=-1", "training.num_train_epochs=1")
    assert code == 0
    assert out == (
        f"{config}: ok (optimizer adamw, scheduler cosine; 1 check needs real weights (or the data) and run at "
        "train: scheduler 'cosine' (the run's step count comes from the data))\n"
    )


# ---- the one check path: the factory, the trainer and the app run the same checks --------------------


class _ProbeConfig(optiplug.OptimizerConfig):
    name: Literal["probe_sgd"] = "probe_sgd"
    lr: float = 0.1
    momentum: float = 0.0  # no bounds: torch's SGD checks it itself
    check_with: Literal["nothing", "missing module", "real tensors"] = "nothing"


def _probe_check(ctx: optiplug.BuildContext, cfg: _ProbeConfig) -> None:
    if cfg.check_with == "missing module":
        import optiplug_no_such_module  # noqa: F401
    if cfg.check_with == "real tensors":
        float(next(p for _, p in ctx.named_parameters()).abs().sum().item())  # meta tensors have no values


def _probe_build(ctx: optiplug.BuildContext, cfg: _ProbeConfig):
    import torch

    return torch.optim.SGD(ctx.param_groups(), lr=cfg.lr, momentum=cfg.momentum)


class _ProbePlugin:
    @optiplug.hookimpl
    def register_optimizers(self, register):
        register(
            optiplug.OptimizerEntry(config=_ProbeConfig, build=_probe_build, check=_probe_check, requires=("torch",))
        )


def _trainer(tmp_path, **optimizer):
    from optiplug.testing import TokenBlocks, training_args

    return optiplug.OptiTrainer(
        model=tiny_llama(),
        args=training_args(tmp_path, max_steps=1),
        train_dataset=TokenBlocks(),
        optimizer={"name": "probe_sgd", **optimizer},
    )


def test_a_constructors_refusal_names_the_field_on_every_route(tmp_path, temp_plugin):
    temp_plugin(_ProbePlugin(), "probe-plugin")
    expected = "optimizer.momentum: Invalid momentum value: -0.5 (got -0.5)"
    with pytest.raises(optiplug.ConfigError) as built:
        optiplug.build_optimizer(tiny_llama(), "probe_sgd", momentum=-0.5)
    trainer = _trainer(tmp_path, momentum=-0.5)
    with pytest.raises(optiplug.ConfigError) as trained:
        trainer.train()
    assert str(built.value) == str(trained.value) == expected
    assert trainer.state.global_step == 0
    (_, validated), (_, ran) = validate_and_train(tmp_path, "optimizer.name=probe_sgd", "optimizer.momentum=-0.5")
    assert validated == ran == f"optiplug: {expected}\n"


def test_a_missing_module_in_a_check_is_a_missing_dependency_on_every_route(tmp_path, temp_plugin):
    temp_plugin(_ProbePlugin(), "probe-plugin")
    expected = (
        "optimizer 'probe_sgd' needs the module 'optiplug_no_such_module', which is not installed: pip install 'torch'"
    )
    with pytest.raises(optiplug.MissingDependencyError) as built:
        optiplug.build_optimizer(tiny_llama(), "probe_sgd", check_with="missing module")
    with pytest.raises(optiplug.MissingDependencyError) as checked:
        _trainer(tmp_path, check_with="missing module").check_optimizer()
    assert str(built.value) == str(checked.value) == expected
    (_, validated), (_, ran) = validate_and_train(
        tmp_path, "optimizer.name=probe_sgd", "optimizer.check_with=missing module"
    )
    assert validated == ran == f"optiplug: {expected}\n"


def test_a_check_that_needs_real_tensors_is_listed_by_validate_and_runs_at_train(tmp_path, temp_plugin):
    temp_plugin(_ProbePlugin(), "probe-plugin")
    config = tiny_run_config(tmp_path)
    code, out, _ = run_cli("validate", str(config), "optimizer.name=probe_sgd", "optimizer.check_with=real tensors")
    assert code == 0
    assert out.startswith(
        f"{config}: ok (optimizer probe_sgd, scheduler cosine; 1 check needs real weights (or the data) and run at "
        "train: probe_sgd's check ("
    )
    _trainer(tmp_path, check_with="real tensors").check_optimizer()  # with weights it runs, and passes


def _every_optimizer() -> list[str]:
    return [row.name for row in optiplug.list_optimizers()]


@pytest.mark.parametrize("name", _every_optimizer())
def test_every_optimizer_is_refused_on_the_skeleton_exactly_when_it_is_refused_on_the_weights(name, tmp_path):
    """What validate builds on the meta skeleton agrees with the build on real weights, for every registered entry:
    no false refusal at validate, no refusal left to train."""
    import torch

    from optiplug.factory import build_from_entry, check_before_training
    from optiplug.testing import training_args

    args = training_args(tmp_path, max_steps=10)
    cfg, constant = optiplug.parse_optimizer(name), optiplug.parse_scheduler("constant")  # fits every optimizer
    with torch.device("meta"):
        skeleton = tiny_llama()
    try:
        ctx = optiplug.BuildContext(model=skeleton, args=args, scheduler_config=constant)
        left, refused = check_before_training(ctx, cfg, constant, 10), None
    except optiplug.OptiplugError as error:
        left, refused = [], str(error)
    assert left == []  # every registered optimizer checks and builds without weights
    try:
        ctx = optiplug.BuildContext(model=tiny_llama(), args=args, scheduler_config=constant)
        build_from_entry(optiplug.get_entry(name), ctx, cfg)
        on_weights = None
    except optiplug.OptiplugError as error:
        on_weights = str(error)
    assert refused == on_weights
