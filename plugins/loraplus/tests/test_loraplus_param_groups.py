"""optimizer.param_groups with LoRA+: the user's groups are split by LoRA+ kind and keep LoRA+'s ratio."""

from __future__ import annotations

import pytest

import optiplug
from optiplug.params import GROUP_KEY
from optiplug.testing import TokenBlocks, logged_losses, tiny_llama, training_args

pytest.importorskip("peft")


def lora_llama():
    from peft import LoraConfig, get_peft_model

    return get_peft_model(tiny_llama(seed=0), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def test_a_group_scales_both_lora_matrices_and_keeps_the_ratio():
    model = lora_llama()
    optimizer = optiplug.build_optimizer(
        model, "loraplus", lr=1e-3, lr_ratio=8, param_groups=[{"match": r"layers\.0\.", "lr_scale": 0.5}]
    )
    rows = [(g[GROUP_KEY], g["name"], len(g["params"]), g["lr"]) for g in optimizer.param_groups]
    assert rows == [
        ("default", "lora_A", 2, 1e-3),
        (r"layers\.0\.", "lora_A", 2, pytest.approx(5e-4)),
        ("default", "lora_B", 2, 8e-3),
        (r"layers\.0\.", "lora_B", 2, pytest.approx(4e-3)),
    ]


def test_trains_with_groups_and_logs_their_rates(tmp_path):
    trainer = optiplug.OptiTrainer(
        model=lora_llama(),
        args=training_args(tmp_path, max_steps=4),
        train_dataset=TokenBlocks(n=32, distinct=4),
        optimizer={"name": "loraplus", "lr": 1e-3, "param_groups": [{"match": r"layers\.1\.", "lr": 2e-3}]},
        scheduler="constant",
    )
    trainer.train()
    record = next(r for r in trainer.state.log_history if "loss" in r)
    assert (record["lr/default"], record[r"lr/layers\.1\."]) == (1e-3, 2e-3)  # each group's lora_A rate
    assert len(logged_losses(trainer)) == 4


def test_resume_with_groups_is_exact(tmp_path):
    optimizer = {"name": "loraplus", "lr": 1e-3, "param_groups": [{"match": r"layers\.0\.", "lr_scale": 0.5}]}

    def trainer(path, **args):
        return optiplug.OptiTrainer(
            model=lora_llama(),
            args=training_args(path, max_steps=6, **args),
            train_dataset=TokenBlocks(n=32, distinct=4),
            optimizer=optimizer,
            scheduler={"name": "cosine", "warmup_steps": 2},
        )

    full = trainer(tmp_path / "full", save_strategy="steps", save_steps=3)
    full.train()
    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    after = {s: v for s, v in logged_losses(resumed).items() if s > 3}
    assert after == {s: v for s, v in logged_losses(full).items() if s > 3} and len(after) == 3
