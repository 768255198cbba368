"""Every TrainingArguments.optim name of the installed transformers, name by name against transformers' own Trainer.

A name is either mapped (OptiTrainer with no optimizer= takes exactly transformers' steps) or refused
with one line; a name a future transformers adds fails ``test_every_name_is_classified`` until it is mapped.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import pytest

import optiplug
from optiplug.testing import TokenBlocks, logged_losses, tiny_llama, training_args

transformers = pytest.importorskip("transformers")

# Measured: every mapped name takes transformers' steps bit for bit on this tiny model (3 steps, lr 1e-3,
# weight decay 0.01), so the test asks for equality; a future rounding change must be looked at, not absorbed.

BNB = [
    "adamw_bnb_8bit",
    "adamw_8bit",
    "paged_adamw_32bit",
    "paged_adamw_8bit",
    "ademamix",
    "ademamix_8bit",
    "paged_ademamix_32bit",
    "paged_ademamix_8bit",
    "lion_8bit",
    "lion_32bit",
    "paged_lion_32bit",
    "paged_lion_8bit",
    "rmsprop_bnb",
    "rmsprop_bnb_8bit",
    "rmsprop_bnb_32bit",
]
SAME = ["adamw_torch", "adamw_torch_fused", "sgd", "adagrad", "rmsprop", "adafactor", "grokadamw", "lomo", *BNB]
SAME_SLOW = ["adamw_torch_8bit", "adamw_torch_4bit"]  # torchao compiles each update: tens of seconds a process
REFUSED = {
    "adamw_torch_xla": "torch_xla is not installed",
    "adamw_torch_npu_fused": "torch_npu is not installed",
    "adamw_anyprecision": "not installable from PyPI",
}


@contextlib.contextmanager
def galore_torch_8bit_on_cpu():
    """transformers' galore_adamw_8bit as it would step without galore-torch's two defects: its step calls
    torch.cuda.synchronize() (no CPU run at all), and its positional arguments land in bitsandbytes >= 0.44's
    max_unorm=100 and skip_zeros=True (an update limit relative to the zeroed weight it steps)."""
    import galore_torch.adamw8bit as module
    import torch
    from bitsandbytes.optim.optimizer import Optimizer2State

    def init(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *args, **kwargs):
        Optimizer2State.__init__(self, "adam", params, lr, betas, eps, weight_decay, optim_bits=8)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module.AdamW8bit, "__init__", init)
        patch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
        yield


@contextlib.contextmanager
def adalomo_on_cpu():
    """transformers' adalomo with lomo-optim's AdaLomo able to run on the CPU: it allocates its moments with
    .cuda() unconditionally (optiplug's keeps them on the parameter's device)."""
    import torch

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
        yield


@dataclasses.dataclass(frozen=True)
class Case:
    """How a name is compared: the TrainingArguments both runs get (beyond ARGS), those only transformers' run gets
    where optiplug deliberately differs (``why``), and the relative loss gap allowed (0: equal bit for bit)."""

    args: dict = dataclasses.field(default_factory=dict)
    reference: dict = dataclasses.field(default_factory=dict)
    why: str = ""
    tolerance: float = 0.0
    patch: Any = None


TARGETS = {"optim_target_modules": ["attn", "mlp"]}
# transformers' *_layerwise optimizers never step their schedule and clip nothing (its hooks step before the
# Trainer clips); optiplug's layerwise: true does both. With a constant rate and no clipping the steps are the same.
LAYERWISE = {**TARGETS, "lr_scheduler_type": "constant", "max_grad_norm": 0}
LAYERWISE_WHY = "transformers' layerwise optimizer never steps its schedule, clips nothing and saves no state"
# schedule-free: transformers runs its default linear decay (and a second warmup) on top; optiplug runs constant.
SCHEDULE_FREE_WHY = "optiplug runs schedule-free on a constant rate when the arguments name no schedule"
GALORE_8BIT_WHY = (
    "galore-torch's 8-bit class calls torch.cuda.synchronize and misplaces positional arguments (max_unorm=100, "
    "skip_zeros); optiplug decays norms and biases by 0, galore-torch by 0.01"
)
CASES = {
    **{name: Case() for name in SAME},
    "galore_adamw": Case(
        {
            "optim_target_modules": "all-linear",
            "optim_args": "rank=4, update_proj_gap=2, scale=0.5, proj_type=reverse_std",
        }
    ),
    "galore_adafactor": Case(TARGETS),
    "galore_adamw_8bit": Case(TARGETS, why=GALORE_8BIT_WHY, tolerance=2e-6, patch=galore_torch_8bit_on_cpu),
    "galore_adamw_layerwise": Case(LAYERWISE, why=LAYERWISE_WHY),
    "galore_adamw_8bit_layerwise": Case(
        LAYERWISE, why=f"{LAYERWISE_WHY}; {GALORE_8BIT_WHY}", tolerance=2e-6, patch=galore_torch_8bit_on_cpu
    ),
    "galore_adafactor_layerwise": Case(
        LAYERWISE,
        {"optim": "galore_adafactor"},
        why="transformers cannot build it (its layerwise Adafactors get relative_step=True with a learning rate)",
    ),
    # rank 8: with transformers' default 128, above these matrices' sides, apollo-torch draws a larger projection
    "apollo_adamw": Case({**TARGETS, "optim_args": "rank=8"}),
    "apollo_adamw_layerwise": Case(
        {**LAYERWISE, "optim_args": "rank=8, proj=svd"},
        why=f"{LAYERWISE_WHY}; its one-parameter optimizers seed every random projection alike (optiplug: per weight)",
    ),
    "adalomo": Case(patch=adalomo_on_cpu),
    "stable_adamw": Case({"optim_args": "kahan_sum=True, decouple_lr=True, max_lr=2e-3"}),
    "schedule_free_adamw": Case({"warmup_steps": 2}, {"lr_scheduler_type": "constant"}, why=SCHEDULE_FREE_WHY),
    "schedule_free_sgd": Case({"warmup_steps": 2}, {"lr_scheduler_type": "constant"}, why=SCHEDULE_FREE_WHY),
    "schedule_free_radam": Case({}, {"lr_scheduler_type": "constant"}, why=SCHEDULE_FREE_WHY),
}
ARGS = dict(max_steps=3, learning_rate=1e-3, weight_decay=0.01)


def test_every_name_is_classified():
    from transformers.training_args import OptimizerNames

    names = {n.value for n in OptimizerNames}
    classified = set(CASES) | set(SAME_SLOW) | set(REFUSED)
    assert names - classified == set(), "transformers has optimizer names optiplug does not map or refuse yet"
    assert classified - names == set()


def _losses(tmp_path, name: str, trainer_class, **extra):
    args = training_args(tmp_path / trainer_class.__name__, **{"optim": name, **ARGS, **extra})
    trainer = trainer_class(model=tiny_llama(), args=args, train_dataset=TokenBlocks(n=32, distinct=4))
    trainer.train()
    return logged_losses(trainer)


@pytest.mark.parametrize("name", [*CASES, *(pytest.param(n, marks=pytest.mark.slow) for n in SAME_SLOW)])
def test_a_mapped_name_takes_transformers_steps(name, tmp_path):
    import warnings

    case = CASES.get(name, Case())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' paged fallback on CPU, and ours
        with case.patch() if case.patch else contextlib.nullcontext():
            reference = _losses(tmp_path, name, transformers.Trainer, **{**case.args, **case.reference})
        ours = _losses(tmp_path, name, optiplug.OptiTrainer, **case.args)
    if case.tolerance:
        assert ours.keys() == reference.keys()
        gap = max(abs(ours[step] - reference[step]) / abs(reference[step]) for step in reference)
        assert 0 < gap <= case.tolerance, (name, gap)  # 0 would mean the difference the case names is gone
    else:
        assert ours == reference, name


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_a_refused_name_says_why_in_one_line(name, tmp_path):
    with pytest.raises(optiplug.ConfigError) as error:
        optiplug.OptiTrainer(
            model=tiny_llama(), args=training_args(tmp_path, optim=name), train_dataset=TokenBlocks(n=8)
        )
    message = str(error.value)
    assert "\n" not in message and f"TrainingArguments.optim={name!r}" in message and REFUSED[name] in message


def test_optim_args_reach_the_config(tmp_path):
    trainer = optiplug.OptiTrainer(
        model=tiny_llama(),
        args=training_args(tmp_path, optim="sgd", optim_args="momentum=0.5,nesterov=true"),
        train_dataset=TokenBlocks(n=8),
    )
    assert (trainer.optimizer_config.name, trainer.optimizer_config.momentum) == ("sgd", 0.5)
    assert trainer.optimizer_config.nesterov is True
    with pytest.raises(optiplug.ConfigError, match=r"TrainingArguments\.optim='sgd'.*rank"):
        optiplug.OptiTrainer(
            model=tiny_llama(), args=training_args(tmp_path, optim="sgd", optim_args="rank=4"), train_dataset=[]
        )


def test_optimizer_and_a_different_args_optim_disagree(tmp_path):
    with pytest.raises(optiplug.ConfigError, match=r"TrainingArguments\.optim='sgd' and optimizer='adamw' disagree"):
        optiplug.OptiTrainer(
            model=tiny_llama(), args=training_args(tmp_path, optim="sgd"), train_dataset=[], optimizer="adamw"
        )
    same = optiplug.OptiTrainer(
        model=tiny_llama(), args=training_args(tmp_path, optim="adamw_8bit"), train_dataset=[], optimizer="bnb_adamw"
    )
    assert same.optimizer_config.name == "bnb_adamw"


def test_low_rank_and_schedule_free_names_carry_transformers_values(tmp_path):
    def config(**args):
        trainer = optiplug.OptiTrainer(model=tiny_llama(), args=training_args(tmp_path, **args), train_dataset=[])
        return trainer.optimizer_config, trainer.scheduler_config

    galore, _ = config(optim="galore_adamw_8bit_layerwise", optim_target_modules="all_linear", weight_decay=0.1)
    assert (galore.name, galore.projection, galore.layerwise, galore.target_modules) == (
        "galore_adamw8bit",
        "svd",
        True,
        ".*",
    )
    assert (galore.rank, galore.update_proj_gap, galore.scale, galore.weight_decay) == (128, 200, 0.25, 0.01)
    apollo, _ = config(optim="apollo_adamw", optim_target_modules=["attn"], optim_args="scale=2")
    assert (apollo.eps, apollo.eps_not_targeted, apollo.scale, apollo.weight_decay) == (1e-8, 1e-6, 2.0, 0.0)
    free, schedule = config(optim="schedule_free_adamw", warmup_steps=5)
    assert (free.warmup_steps, schedule.name) == (5, "constant")  # the optimizer warms up, once


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            dict(optim="galore_adamw", optim_target_modules=["attn"], optim_args="weight_decay=0.1"),
            "TrainingArguments.optim='galore_adamw': optim_args key 'weight_decay' is not read by transformers' "
            "Trainer for this optimizer (it reads rank, update_proj_gap, scale, proj_type), so it would not change "
            "its steps: drop it, or select the optimizer with an optimizer section to set other fields",
        ),
        (
            dict(optim="apollo_adamw_layerwise"),
            "TrainingArguments.optim='apollo_adamw_layerwise': this optimizer needs "
            "TrainingArguments.optim_target_modules (transformers' Trainer refuses it unset too): set it to "
            "'all-linear', a regex, or a list of module names such as ['attn', 'mlp']",
        ),
        (
            dict(optim="schedule_free_sgd", warmup_steps=0.1),
            "TrainingArguments.optim='schedule_free_sgd': warmup_steps=0.1 is a fraction of the run, which "
            "transformers' Trainer hands to the schedule-free optimizer as a step count (a rate 1/fraction times too "
            "high on the first step): give warmup_steps as a number of steps",
        ),
    ],
)
def test_what_transformers_would_ignore_or_get_wrong_is_refused_in_one_line(tmp_path, args, message):
    with pytest.raises(optiplug.ConfigError) as error:
        optiplug.OptiTrainer(model=tiny_llama(), args=training_args(tmp_path, **args), train_dataset=[])
    assert str(error.value) == message


def test_a_run_config_selects_its_sections_by_transformers_names():
    from optiplug.app.config import RunConfig

    run = RunConfig.model_validate(
        {"training": {"optim": "galore_adamw", "optim_target_modules": "all-linear", "optim_args": "rank=8"}}
    )
    assert (run.optimizer.name, run.optimizer.rank, run.optimizer.target_modules) == ("galore_adamw", 8, ".*")
    assert run.optimizer.lr == 5e-5  # TrainingArguments' default rate, as transformers' Trainer would take
    free = RunConfig.model_validate({"training": {"optim": "schedule_free_sgd", "warmup_steps": 5}})
    assert (free.optimizer.warmup_steps, free.scheduler.name, "warmup_steps" in free.training) == (5, "constant", False)
    wsd = RunConfig.model_validate(
        {
            "training": {
                "lr_scheduler_type": "warmup_stable_decay",
                "lr_scheduler_kwargs": {"num_decay_steps": 3},
                "warmup_steps": 0.1,
            }
        }
    )
    assert (wsd.scheduler.decay_steps, wsd.scheduler.warmup_ratio, "warmup_steps" in wsd.training) == (3, 0.1, False)
    same = RunConfig.model_validate({"training": {"optim": "paged_adamw_8bit"}, "optimizer": {"name": "bnb_adamw"}})
    assert same.optimizer.name == "bnb_adamw"
    with pytest.raises(optiplug.ConfigError, match=r"^TrainingArguments.optim='adamw_anyprecision' needs torchdistx"):
        RunConfig.model_validate({"training": {"optim": "adamw_anyprecision"}})


@pytest.mark.parametrize(
    ("name", "first_line"),
    [
        (
            "galore_adamw_8bit_layerwise",
            "galore_adamw_8bit_layerwise: transformers' name for optimizer 'galore_adamw8bit' with projection='svd', layerwise=True",
        ),
        ("stable_adamw", "stable_adamw  (optimizer, plugin optiplug-optimi)"),
        ("adamw_torch_xla", "optiplug: TrainingArguments.optim='adamw_torch_xla' is torch_xla's AdamW for TPUs"),
    ],
)
def test_optiplug_show_says_what_a_transformers_name_is(capsys, name, first_line):
    from optiplug.app.cli import main

    with contextlib.suppress(SystemExit):
        main(["show", name])
    out, err = capsys.readouterr()
    assert (out or err).splitlines()[0].startswith(first_line)


def test_offload_to_cpu_is_refused_on_a_cpu_model_and_its_factory_rebuilds_the_optimizer_per_parameter(tmp_path):
    import torch

    from optiplug.offload import one_group_factory

    trainer = optiplug.OptiTrainer(
        model=tiny_llama(),
        args=training_args(tmp_path),
        train_dataset=[],
        optimizer={"name": "adamw", "offload": "cpu"},
    )
    with pytest.raises(optiplug.ConfigError) as error:
        trainer.check_optimizer()
    assert str(error.value) == (
        "adamw with offload: cpu moves the optimizer's state and step from the accelerator to the CPU, and the model "
        "is on cpu (torchao's CPUOffloadOptimizer needs CUDA or XPU parameters): remove optimizer.offload"
    )
    with pytest.raises(optiplug.ConfigError, match="lomo with offload: cpu is not possible"):
        optiplug.build_optimizer(tiny_llama(), {"name": "lomo", "offload": "cpu"})
    # what torchao does with the factory, on the CPU: one optimizer per parameter, stepping as the whole one does
    model, twin = tiny_llama(), tiny_llama()
    whole = optiplug.build_optimizer(model, {"name": "adamw", "lr": 1e-2, "weight_decay": 0.1})
    factory = one_group_factory(optiplug.build_optimizer(twin, {"name": "adamw", "lr": 1e-2, "weight_decay": 0.1}))
    groups = optiplug.build_optimizer(twin, {"name": "adamw", "lr": 1e-2, "weight_decay": 0.1}).param_groups
    singles = [
        factory([{**{k: v for k, v in g.items() if k != "params"}, "params": [p]}]) for g in groups for p in g["params"]
    ]
    for m in (model, twin):
        block = TokenBlocks(n=2)[0]
        m(input_ids=block["input_ids"][None], labels=block["labels"][None]).loss.backward()
    whole.step()
    for single in singles:
        single.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
