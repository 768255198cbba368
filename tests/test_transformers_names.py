"""Every TrainingArguments.optim name of the installed transformers, name by name against transformers' own Trainer.

A name is either mapped (OptiTrainer with no optimizer= takes exactly transformers' steps) or refused
with one line; a name a future transformers adds fails ``test_every_name_is_classified`` until it is mapped.
"""

from __future__ import annotations

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
SAME = ["adamw_torch", "adamw_torch_fused", "sgd", "adagrad", "rmsprop", "adafactor", *BNB]
SAME_SLOW = ["adamw_torch_8bit", "adamw_torch_4bit"]  # torchao compiles each update: tens of seconds a process
REFUSED = {
    "adamw_torch_xla": "torch_xla is not installed",
    "adamw_torch_npu_fused": "torch_npu is not installed",
    "adamw_anyprecision": "not installable from PyPI",
    # optiplug has these optimizers (select them explicitly) but their plugins declare no transformers mapping yet:
    **dict.fromkeys(
        [
            "galore_adamw",
            "galore_adamw_8bit",
            "galore_adafactor",
            "galore_adamw_layerwise",
            "galore_adamw_8bit_layerwise",
            "galore_adafactor_layerwise",
            "apollo_adamw",
            "apollo_adamw_layerwise",
            "schedule_free_adamw",
            "schedule_free_sgd",
            "schedule_free_radam",
        ],
        "declares no transformers mapping",
    ),
    # no optiplug plugin yet
    **dict.fromkeys(["lomo", "adalomo", "grokadamw", "stable_adamw"], "not mapped by any installed optiplug plugin"),
}
ARGS = dict(max_steps=3, learning_rate=1e-3, weight_decay=0.01)


def test_every_name_is_classified():
    from transformers.training_args import OptimizerNames

    names = {n.value for n in OptimizerNames}
    classified = set(SAME) | set(SAME_SLOW) | set(REFUSED)
    assert names - classified == set(), "transformers has optimizer names optiplug does not map or refuse yet"
    assert classified - names == set()


def _losses(tmp_path, name: str, trainer_class, **extra):
    args = training_args(tmp_path / trainer_class.__name__, optim=name, **ARGS, **extra)
    trainer = trainer_class(model=tiny_llama(), args=args, train_dataset=TokenBlocks(n=32, distinct=4))
    trainer.train()
    return logged_losses(trainer)


@pytest.mark.parametrize("name", [*SAME, *(pytest.param(n, marks=pytest.mark.slow) for n in SAME_SLOW)])
def test_a_mapped_name_takes_transformers_steps(name, tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' paged fallback on CPU, and ours
        reference = _losses(tmp_path, name, transformers.Trainer)
        ours = _losses(tmp_path, name, optiplug.OptiTrainer)
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
