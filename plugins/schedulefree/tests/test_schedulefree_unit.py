"""Schedule-free outside a training run: configs, checks, the exact switch, the saved state, state bytes."""

from __future__ import annotations

import io
import subprocess
import sys
from types import SimpleNamespace

import pytest
import schedulefree
import torch
from optiplug_schedulefree import ScheduleFreeAdamWConfig, ScheduleFreeRAdamConfig, ScheduleFreeSGDConfig
from optiplug_schedulefree.optim import ExactSwitch
from pydantic import ValidationError

import optiplug
from optiplug.testing import TokenBlocks, tiny_llama, training_args

NAMES = ["schedule_free_adamw", "schedule_free_sgd", "schedule_free_radam"]
UPSTREAM = {
    "schedule_free_adamw": schedulefree.AdamWScheduleFree,
    "schedule_free_sgd": schedulefree.SGDScheduleFree,
    "schedule_free_radam": schedulefree.RAdamScheduleFree,
}
LR = {"schedule_free_adamw": 1e-2, "schedule_free_sgd": 0.5, "schedule_free_radam": 1e-2}


def trained(name: str, steps: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny model and the plugin's optimizer after ``steps`` steps, in train mode."""
    model = tiny_llama(seed=seed).to(dtype)
    optimizer = optiplug.build_optimizer(model, name, lr=LR[name])
    data = TokenBlocks(n=8, distinct=4)
    ids = torch.stack([data[i]["input_ids"] for i in range(8)])
    optimizer.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ---- configs ----
def test_configs_validate_their_fields():
    assert ScheduleFreeAdamWConfig().lr == 2.5e-3 and ScheduleFreeSGDConfig().momentum == 0.9
    with pytest.raises(ValidationError, match="betas\\[0\\] must be above 0"):
        ScheduleFreeAdamWConfig(betas=(0.0, 0.999))
    with pytest.raises(ValidationError):
        ScheduleFreeRAdamConfig(betas=(0.9, 1.0))  # optiplug.Betas: each in [0, 1)
    with pytest.raises(ValidationError):
        ScheduleFreeSGDConfig(momentum=1.0)
    with pytest.raises(ValidationError):
        ScheduleFreeAdamWConfig(lr=0)
    with pytest.raises(ValidationError):
        ScheduleFreeAdamWConfig(warmup_steps=-1)
    with pytest.raises(ValidationError, match="warmup_steps"):
        ScheduleFreeRAdamConfig(warmup_steps=10)  # RAdam's rectification is its warmup: no such field


def test_importing_the_plugin_does_not_import_torch():
    code = "import sys, optiplug, optiplug_schedulefree; optiplug.list_optimizers(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# ---- checks ----
@pytest.mark.parametrize("name", NAMES)
def test_a_scheduler_other_than_constant_is_refused_before_any_step(tmp_path, name):
    trainer = optiplug.OptiTrainer(
        model=tiny_llama(),
        args=training_args(tmp_path, max_steps=2),
        train_dataset=TokenBlocks(n=8),
        optimizer=name,
        scheduler={"name": "cosine", "warmup_steps": 2},
    )
    with pytest.raises(
        optiplug.ConfigError, match=f"^{name}: the learning-rate scheduler must be 'constant', not 'cos"
    ):
        trainer.train()
    assert trainer.state.global_step == 0


def test_the_trainer_arguments_scheduler_and_warmup_are_checked_without_a_scheduler_section(tmp_path):
    model = tiny_llama()
    untouched = optiplug.OptiTrainer(model=model, args=training_args(tmp_path), optimizer="schedule_free_adamw")
    assert untouched.scheduler_config.name == "constant"  # the entry's default_scheduler: arguments chose none
    untouched.check_optimizer()
    cosine = optiplug.OptiTrainer(
        model=model, args=training_args(tmp_path, lr_scheduler_type="cosine"), optimizer="schedule_free_adamw"
    )
    with pytest.raises(optiplug.ConfigError, match=r"not 'cosine'.*set scheduler\.name to constant"):
        cosine.check_optimizer()
    constant = optiplug.OptiTrainer(
        model=model, args=training_args(tmp_path, lr_scheduler_type="constant"), optimizer="schedule_free_adamw"
    )
    constant.check_optimizer()
    warm = optiplug.OptiTrainer(
        model=model,
        args=training_args(tmp_path, lr_scheduler_type="constant", warmup_steps=5),
        optimizer="schedule_free_sgd",
    )
    with pytest.raises(optiplug.ConfigError, match=r"optimizer\.warmup_steps"):
        warm.check_optimizer()
    optiplug.build_optimizer(model, "schedule_free_adamw")  # no trainer, no arguments: nothing to refuse


# The DeepSpeed set-ups whose copy of the weights the switch cannot reach (ZeRO stages 1-3 train: see
# test_schedulefree_sharded.py), with the config that asks for each and the Trainer's half-precision flags.
REFUSED_DEEPSPEED = {
    "stage 0, bf16": (
        {"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}},
        {},
        "schedule_free_radam: DeepSpeed ZeRO stage 0 with fp16/bf16 steps fp32 master weights that the switch between "
        "the training point y and the saved weights x cannot reach: set zero_optimization.stage to 1, 2 or 3",
    ),
    "stage 0, fp16 auto": (
        {"zero_optimization": {"stage": 0}, "fp16": {"enabled": "auto"}},
        {"fp16": True},
        "schedule_free_radam: DeepSpeed ZeRO stage 0 with fp16/bf16 steps fp32 master weights that the switch between "
        "the training point y and the saved weights x cannot reach: set zero_optimization.stage to 1, 2 or 3",
    ),
    "elastic checkpoint": (
        {"zero_optimization": {"stage": 2, "elastic_checkpoint": True}},
        {},
        "schedule_free_radam: DeepSpeed's elastic_checkpoint saves only the per-parameter state tensors, not "
        "schedule-free's per-group averaging weights and step count, so a resumed run would restart its average: set "
        "zero_optimization.elastic_checkpoint to false",
    ),
    "nvme": (
        {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}},
        {},
        "schedule_free_radam: DeepSpeed's NVMe offload swaps the weights out between steps, where the switch between "
        "the training point y and the saved weights x cannot reach them: offload to cpu or not at all "
        "(zero_optimization.offload_param.device is nvme)",
    ),
}


@pytest.mark.parametrize("case", REFUSED_DEEPSPEED)
def test_deepspeed_set_ups_the_switch_cannot_reach_are_refused(case):
    from optiplug_schedulefree import check_deepspeed

    config, flags, message = REFUSED_DEEPSPEED[case]
    with pytest.raises(optiplug.ConfigError) as error:
        check_deepspeed("schedule_free_radam", config, SimpleNamespace(**{"fp16": False, "bf16": False, **flags}))
    assert str(error.value) == message


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_zero_stages_and_fsdp_pass_the_check(stage):
    from optiplug_schedulefree import check_deepspeed

    config = {
        "zero_optimization": {"stage": stage, "offload_optimizer": {"device": "cpu"}},
        "bf16": {"enabled": "auto"},
    }
    check_deepspeed("schedule_free_adamw", config, SimpleNamespace(fp16=False, bf16=stage > 0))
    trainer = SimpleNamespace(accelerator=object(), scheduler_config=SimpleNamespace(name="constant"),
                              is_deepspeed_enabled=False, is_fsdp_enabled=True)  # fmt: skip
    entry = optiplug.get_entry("schedule_free_adamw")
    entry.check(optiplug.BuildContext(model=tiny_llama(), trainer=trainer), entry.config())


def test_an_engine_with_its_own_copy_of_the_weights_is_refused_never_silently_missed():
    from optiplug_schedulefree.engines import EngineWeights, engine_weights

    class AnotherEngineOptimizer:
        """Holds the optimizer the way DeepSpeed's wrappers do, with weights the plugin does not know how to reach."""

    with pytest.raises(optiplug.ConfigError) as error:
        engine_weights("schedule_free_sgd", AnotherEngineOptimizer())
    assert str(error.value) == (
        "schedule_free_sgd: the optimizer runs inside AnotherEngineOptimizer, which steps its own copy of the weights; "
        "the switch between the training point y and the saved weights x is wired for DeepSpeed ZeRO stages 1-3 only: "
        "train with DDP, FSDP or a DeepSpeed ZeRO stage from 1 to 3"
    )
    assert type(engine_weights("schedule_free_sgd", None)) is EngineWeights  # the model's own weights: nothing to do


# ---- the switch and the state ----
@pytest.mark.parametrize("name", NAMES)
def test_eval_then_train_gives_y_back_bit_for_bit_where_upstream_does_not(name):
    model, optimizer = trained(name)
    y = params(model)
    optimizer.eval()
    x = params(model)
    optimizer.train()
    assert all(torch.equal(a, b) for a, b in zip(params(model), y))
    assert any(not torch.equal(a, b) for a, b in zip(x, y))

    upstream = UPSTREAM[name]
    upstream.eval(optimizer)  # schedulefree's own in-place switch on the same state
    assert all(torch.equal(a, b) for a, b in zip(params(model), x))  # the same x
    upstream.train(optimizer)
    assert any(not torch.equal(a, b) for a, b in zip(params(model), y))  # but y does not come back exactly


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_through_weights_only_load_restores_y_whatever_the_weights(name):
    model, optimizer = trained(name)
    optimizer.eval()
    x = params(model)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    optimizer.train()
    y = params(model)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert all(set(state) >= {"z", "y"} for state in saved["state"].values())

    fresh_model = tiny_llama(seed=5)  # weights that are neither x nor y: training must not depend on them
    fresh = optiplug.build_optimizer(fresh_model, name, lr=LR[name])
    fresh.load_state_dict(saved)
    assert not fresh.in_train_mode and all("y" not in s for s in fresh.state.values())
    fresh.train()
    assert all(torch.equal(a, b) for a, b in zip(params(fresh_model), y))
    for key in ("k", "weight_sum", "lr_max"):
        assert fresh.param_groups[0][key] == optimizer.param_groups[0][key]
    assert x  # x is not needed to resume: the checkpoint's weights are for evaluation and deployment


def test_an_upstream_checkpoint_without_y_falls_back_to_upstream_switch():
    model, optimizer = trained("schedule_free_adamw")
    upstream_state = optimizer.state_dict()
    for state in upstream_state["state"].values():
        del state["y"]
    y = params(model)
    fresh_model = tiny_llama(seed=0)
    fresh_model.load_state_dict(model.state_dict())  # an upstream checkpoint saved in train mode holds y
    fresh = optiplug.build_optimizer(fresh_model, "schedule_free_adamw", lr=LR["schedule_free_adamw"])
    fresh.load_state_dict(upstream_state)
    assert fresh.in_train_mode  # the saved mode: the weights loaded are y
    assert all(torch.equal(a, b) for a, b in zip(params(fresh_model), y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", NAMES)
def test_state_bytes_equal_the_measured_state_in_both_modes(name, dtype):
    model, optimizer = trained(name, steps=2, dtype=dtype)
    entry = optiplug.get_entry(name)
    analytic = entry.state_bytes(optiplug.ParamShape.of_model(model), entry.config())
    assert analytic == optiplug.optimizer_state_bytes(optimizer)
    optimizer.eval()
    assert analytic == optiplug.optimizer_state_bytes(optimizer)
    per_param = 2 if name == "schedule_free_sgd" else 3
    assert analytic == per_param * dtype.itemsize * sum(p.numel() for p in model.parameters())


def test_the_switch_is_exact_in_bfloat16_too():
    model, optimizer = trained("schedule_free_adamw", dtype=torch.bfloat16)
    y = params(model)
    optimizer.eval()
    assert any(not torch.equal(a, b) for a, b in zip(params(model), y))
    optimizer.train()
    assert all(torch.equal(a, b) for a, b in zip(params(model), y))


def test_log_values_report_the_warmup_learning_rate():
    model = tiny_llama()
    optimizer = optiplug.build_optimizer(model, "schedule_free_adamw", lr=1e-2, warmup_steps=4)
    assert isinstance(optimizer, ExactSwitch)
    ids = torch.stack([TokenBlocks(n=2)[i]["input_ids"] for i in range(2)])
    optimizer.train()
    seen = []
    for _ in range(5):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seen.append(optimizer.log_values()["schedule_free_lr"])
    assert seen == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2])
