"""GaLore inside transformers' Trainer: parity with transformers, layerwise mode (what GaLore adds to the core's
layerwise stepping, which tests/test_layerwise.py covers), schedules, resume."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

import optiplug
import optiplug.app
from optiplug.testing import TokenBlocks, logged_losses, tiny_llama, training_args

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _galore(**fields):
    return {"name": "galore_adamw", "rank": 8, "update_proj_gap": 3, "lr": 3e-3, **fields}


def _trainer(output_dir, optimizer, scheduler=None, data=None, hidden=64, **args):
    return optiplug.OptiTrainer(
        model=tiny_llama(hidden=hidden),
        args=training_args(output_dir, **args),
        train_dataset=data or TokenBlocks(n=64),
        optimizer=optimizer,
        scheduler=scheduler or {"name": "cosine", "warmup_steps": 2},
    )


def _history(trainer, key):
    return [h[key] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("name", ["galore_adamw", "galore_adafactor"])
def test_svd_losses_equal_transformers_exactly(tmp_path, name):
    from transformers import Trainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # galore-torch's FutureWarning
        reference = Trainer(
            model=tiny_llama(hidden=64),
            args=training_args(
                tmp_path / "transformers",
                max_steps=8,
                learning_rate=3e-3,
                optim=name,
                optim_target_modules=LINEAR,
                optim_args="rank=8,update_proj_gap=3,scale=0.25,proj_type=std",
            ),
            train_dataset=TokenBlocks(n=64),
        )
        reference.train()
    ours = optiplug.OptiTrainer(
        model=tiny_llama(hidden=64),
        args=training_args(tmp_path / "optiplug", max_steps=8, learning_rate=3e-3),
        train_dataset=TokenBlocks(n=64),
        optimizer=_galore(name=name, target_modules=LINEAR, scale=0.25, proj_type="std", projection="svd"),
    )
    ours.train()
    assert logged_losses(ours) == logged_losses(reference)
    assert _history(ours, "grad_norm") == _history(reference, "grad_norm")


def test_layerwise_with_accumulation_matches_the_whole_model_step(tmp_path):
    runs = {}
    lrs_seen: list[tuple[int, float]] = []
    for layerwise in (False, True):
        trainer = _trainer(
            tmp_path / str(layerwise),
            _galore(layerwise=layerwise),
            max_steps=6,
            gradient_accumulation_steps=4,
            per_device_train_batch_size=2,
            max_grad_norm=0.0,
        )
        if layerwise:
            optimizer = trainer.create_optimizer()
            step_params = optimizer.step_parameters

            def spy(group, params, step_params=step_params, trainer=trainer):
                lrs_seen.append((trainer.state.global_step, group["lr"]))
                return step_params(group, params)

            optimizer.step_parameters = spy
        trainer.train()
        runs[layerwise] = trainer
    whole, layerwise = runs[False], runs[True]
    assert optiplug.layerwise_stepper(layerwise.optimizer) and not optiplug.layerwise_stepper(whole.optimizer)
    assert list(logged_losses(layerwise).values()) == pytest.approx(
        list(logged_losses(whole).values()), rel=1e-6, abs=0
    )
    assert _history(layerwise, "grad_norm") == pytest.approx(_history(whole, "grad_norm"), rel=1e-5)
    # every parameter's own step used the scheduled learning rate of its optimizer step (warmup 2, then cosine)
    scheduled = _history(whole, "learning_rate")
    assert scheduled[0] == 0.0 and scheduled[2] == pytest.approx(3e-3)
    n_params = len(list(layerwise.model.parameters()))
    assert len(lrs_seen) == 6 * n_params
    for step, lr in lrs_seen:
        assert lr == pytest.approx(scheduled[step], abs=1e-12), f"step {step}"


def test_layerwise_step_parameters_equal_the_whole_step_bit_for_bit(tmp_path):
    """GaLore's own step_parameters, called by the core's hooks once per parameter (gradient accumulation from the
    run's arguments), gives the weights of its whole step exactly. Counting backward passes, clipping and the
    logged global norm are the core stepper's, the same for every optimizer: tests/test_layerwise.py."""
    from transformers import TrainingArguments

    from optiplug.factory import build_from_entry

    model, twin = tiny_llama(hidden=64), tiny_llama(hidden=64)
    args = TrainingArguments(
        output_dir=str(tmp_path), gradient_accumulation_steps=2, max_grad_norm=0.0, use_cpu=True, report_to="none"
    )
    cfg = optiplug.app.RunConfig(optimizer=_galore(layerwise=True, lr=1e-2)).optimizer
    ctx = optiplug.BuildContext(model=model, args=args)
    layerwise = build_from_entry(optiplug.get_entry("galore_adamw"), ctx, cfg)  # the core makes it layerwise
    whole = optiplug.build_optimizer(twin, _galore(lr=1e-2))
    data = TokenBlocks(n=8)
    for _step in range(3):
        for micro in range(2):
            batch = torch.stack([data[2 * micro + i]["input_ids"] for i in range(2)])
            model(input_ids=batch, labels=batch).loss.backward()
            twin(input_ids=batch, labels=batch).loss.backward()
        whole.step()
        whole.zero_grad()
        layerwise.step()  # a no-op: the hooks already stepped
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert optiplug.layerwise_stepper(layerwise).grad_norm() > 0


def _resume(tmp_path, optimizer, steps=8, save_at=4):
    full = _trainer(tmp_path / "full", optimizer, max_steps=steps, save_strategy="steps", save_steps=save_at)
    full.train()
    checkpoint = tmp_path / "full" / f"checkpoint-{save_at}"
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    resumed = _trainer(tmp_path / "resumed", optimizer, max_steps=steps)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    after = {s: loss for s, loss in logged_losses(resumed).items() if s > save_at}
    reference = {s: loss for s, loss in logged_losses(full).items() if s > save_at}
    return state, after, reference


@pytest.mark.parametrize("layerwise", [False, True], ids=["whole", "layerwise"])
def test_resume_between_two_projection_refreshes_is_exact(tmp_path, layerwise):
    # refreshes at steps 0, 3, 6: the checkpoint at step 4 holds the projection computed at step 3
    state, after, reference = _resume(tmp_path, _galore(layerwise=layerwise, update_proj_gap=3))
    assert after == reference and sorted(after) == [5, 6, 7, 8]
    q_proj = [s for s in state["state"].values() if "proj_right" in s and s["exp_avg"].shape == (64, 8)]
    assert q_proj and all(s["step"] == 4 for s in q_proj)  # every per-parameter state is in optimizer.pt
    n_params = len(list(tiny_llama(hidden=64).parameters()))
    assert len(state["state"]) == n_params


def test_randomized_training_loss_is_within_one_percent_of_the_svd_run(tmp_path):
    losses = {}
    for projection in ("svd", "randomized"):
        trainer = _trainer(
            tmp_path / projection,
            _galore(projection=projection, rank=8, oversampling=4, update_proj_gap=5, lr=1e-2),
            data=TokenBlocks(n=64, distinct=4),
            max_steps=25,
        )
        trainer.train()
        losses[projection] = list(logged_losses(trainer).values())
    svd, randomized = losses["svd"], losses["randomized"]
    assert svd[-1] < 0.7 * svd[0]  # it learned, so the comparison means something
    assert svd != randomized  # and the randomized projector was really used (rank 8 + 4 < 64)
    assert abs(randomized[-1] - svd[-1]) <= 0.01 * svd[-1], f"svd {svd[-1]:.4f}, randomized {randomized[-1]:.4f}"


@pytest.mark.parametrize("name", ["galore_adafactor", "galore_adamw8bit"])
def test_adafactor_and_8bit_train_in_layerwise_mode_and_resume(tmp_path, name):
    fields = {"name": name, "rank": 8, "update_proj_gap": 3, "layerwise": True}
    if name == "galore_adamw8bit":
        fields["min_8bit_size"] = 256  # the 8-bit path for these small matrices
    state, after, reference = _resume(tmp_path, fields, steps=6, save_at=3)
    assert after == reference
    assert all(math.isfinite(x) for x in after.values())
    if name == "galore_adamw8bit":
        quantized = [s["__bnb_optimizer_quant_state__"]["state1"] for s in state["state"].values()]
        assert any(t.dtype == torch.uint8 for t in quantized)


def test_the_examples_are_valid_configs():
    root = Path(__file__).resolve().parents[3] / "examples"
    for name, layerwise in (("galore.yaml", False), ("galore-layerwise.yaml", True)):
        config = optiplug.app.load_config(root / name)
        assert config.optimizer.name == "galore_adamw" and config.optimizer.layerwise is layerwise
