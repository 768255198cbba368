"""APOLLO under the core's layerwise stepping (``optimizer.layerwise: true``): accumulation, schedule, resume."""

from __future__ import annotations

import pytest
import torch

import optiplug
from optiplug.testing import TokenBlocks, logged_losses, tiny_llama, training_args


def _trainer(output_dir, optimizer, **args):
    return optiplug.OptiTrainer(
        model=tiny_llama(hidden=64),
        args=training_args(output_dir, **args),
        train_dataset=TokenBlocks(n=64),
        optimizer=optimizer,
        scheduler={"name": "cosine", "warmup_steps": 2},
    )


def _history(trainer, key):
    return [h[key] for h in trainer.state.log_history if "loss" in h]


def test_both_entries_declare_per_parameter_steps():
    assert optiplug.get_entry("apollo_adamw").per_parameter and optiplug.get_entry("apollo_mini").per_parameter


@pytest.mark.parametrize("name", ["apollo_adamw", "apollo_mini"])
def test_layerwise_with_accumulation_reproduces_the_whole_model_step(tmp_path, name):
    runs = {}
    for layerwise in (False, True):
        optimizer = {"name": name, "rank": 8 if name == "apollo_adamw" else 1, "update_proj_gap": 3, "lr": 3e-3}
        trainer = _trainer(
            tmp_path / str(layerwise),
            {**optimizer, "layerwise": layerwise},
            max_steps=4,  # projections drawn at steps 0 and 3
            gradient_accumulation_steps=4,
            per_device_train_batch_size=2,
            max_grad_norm=0.0,  # layerwise clipping is per parameter: compare without clipping
        )
        trainer.train()
        runs[layerwise] = trainer
    whole, layerwise = runs[False], runs[True]
    assert optiplug.layerwise_stepper(layerwise.optimizer) is not None
    assert optiplug.layerwise_stepper(whole.optimizer) is None
    assert logged_losses(layerwise) == logged_losses(whole)
    assert _history(layerwise, "grad_norm") == pytest.approx(_history(whole, "grad_norm"), rel=1e-5)
    assert _history(layerwise, "learning_rate") == _history(whole, "learning_rate")
    assert all(p.grad is None for p in layerwise.model.parameters())  # freed by the hooks


def test_layerwise_resume_between_two_projection_draws_is_exact(tmp_path):
    optimizer = {"name": "apollo_adamw", "rank": 8, "update_proj_gap": 3, "lr": 3e-3, "layerwise": True}
    full = _trainer(tmp_path / "full", optimizer, max_steps=8, save_strategy="steps", save_steps=4)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-4"
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert len(state["state"]) == len(list(tiny_llama(hidden=64).parameters()))  # every per-parameter state
    resumed = _trainer(tmp_path / "resumed", optimizer, max_steps=8)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    after = {s: loss for s, loss in logged_losses(resumed).items() if s > 4}
    assert after == {s: loss for s, loss in logged_losses(full).items() if s > 4} and sorted(after) == [5, 6, 7, 8]
