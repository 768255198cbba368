"""muon inside transformers' Trainer: training, the routing log line, exact resume, and the refusals."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import optiplug
from optiplug.testing import TokenBlocks, logged_losses, tiny_llama, training_args

MUON = {"name": "muon", "lr": 0.02, "adamw_lr": 3e-3, "weight_decay": 0.05, "adjust_lr": "spectral"}


def _trainer(output_dir, optimizer=None, model=None, data=None, **args):
    return optiplug.OptiTrainer(
        model=model if model is not None else tiny_llama(),
        args=training_args(output_dir, **args),
        train_dataset=data or TokenBlocks(n=64),
        optimizer=optimizer or MUON,
        scheduler={"name": "cosine", "warmup_steps": 2},
    )


def test_trains_logs_the_split_and_schedules_both_learning_rates(tmp_path, caplog):
    trainer = _trainer(tmp_path, max_steps=10, data=TokenBlocks(n=32, distinct=4))  # learnable in 10 steps
    logger = logging.getLogger("transformers.trainer.muon")  # transformers' loggers do not propagate to the root
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="transformers.trainer.muon"):
            trainer.train()
    finally:
        logger.removeHandler(caplog.handler)
    assert "muon: 14 matrices (0.02M parameters) · adamw: 7 tensors (0.01M)" in caplog.messages
    losses = list(logged_losses(trainer).values())
    assert all(math.isfinite(x) for x in losses) and min(losses[-3:]) < losses[0] - 0.3
    records = [h for h in trainer.state.log_history if "loss" in h]
    # Trainer logs group 0's rate (Muon's); the optimizer adds AdamW's: the same schedule at its own peak
    for record in records:
        assert record["adamw_learning_rate"] == pytest.approx(record["learning_rate"] * 3e-3 / 0.02, rel=1e-6)
    assert max(r["learning_rate"] for r in records) == pytest.approx(0.02)


def test_resume_reproduces_the_uninterrupted_run_and_the_checkpoint_is_weights_only(tmp_path):
    full = _trainer(tmp_path / "full", max_steps=8, save_strategy="steps", save_steps=4)
    full.train()
    checkpoint = Path(tmp_path / "full" / "checkpoint-4")
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert [g["use_muon"] for g in saved["param_groups"]] == [True, False, False]
    resumed = _trainer(tmp_path / "resumed", max_steps=8)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    after = {step: loss for step, loss in logged_losses(resumed).items() if step > 4}
    assert after == {step: loss for step, loss in logged_losses(full).items() if step > 4}
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def _lora_model():
    from peft import LoraConfig, get_peft_model

    return get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


LORA_REFUSAL = (
    "muon: this is a LoRA (PEFT) model, and Muon orthogonalizes the update of each whole weight matrix, not of its "
    "thin adapter factors (separately orthogonalized A and B do not give an orthogonal update of B @ A, and "
    "adjust_lr's sqrt(fan_out/fan_in) scales a d x r factor's step by sqrt(d/r)): fine-tune the full model with "
    "muon, or train the adapters with adamw or loraplus"
)


def test_lora_adapters_are_refused_before_any_step(tmp_path):
    pytest.importorskip("peft")
    trainer = _trainer(tmp_path, model=_lora_model(), max_steps=2)
    with pytest.raises(optiplug.ConfigError) as error:
        trainer.train()
    assert str(error.value) == LORA_REFUSAL
    assert trainer.state.global_step == 0 and not logged_losses(trainer)
    with pytest.raises(optiplug.ConfigError) as error:  # also outside a Trainer
        optiplug.build_optimizer(_lora_model(), "muon")
    assert str(error.value) == LORA_REFUSAL


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            {"deepspeed": {"zero_optimization": {"stage": 2}}},
            "muon: DeepSpeed ZeRO (stage 2) hands the optimizer flattened 1-D parameter partitions, so no weight matrix "
            "would reach Muon (it would silently run AdamW on everything): train without training.deepspeed (DDP or a "
            "single process)",
        ),
        (
            {"deepspeed": {"zero_optimization": {"stage": 3}}},
            "muon: DeepSpeed ZeRO (stage 3) hands the optimizer flattened 1-D parameter partitions, so no weight matrix "
            "would reach Muon (it would silently run AdamW on everything): train without training.deepspeed (DDP or a "
            "single process)",
        ),
        (
            {"fsdp": "full_shard"},
            "muon: FSDP shards each weight matrix across processes (flattened or as DTensor row shards), and Muon must "
            "orthogonalize the whole matrix: train without training.fsdp (DDP or a single process)",
        ),
    ],
)
def test_sharding_engines_are_refused(args, message):
    arguments = SimpleNamespace(**{"deepspeed": None, "fsdp": None, "world_size": 2, **args})
    with pytest.raises(optiplug.ConfigError) as error:
        optiplug.get_entry("muon").check(
            optiplug.BuildContext(model=tiny_llama(), args=arguments), optiplug.get_entry("muon").config()
        )
    assert str(error.value) == message


def test_zero3_partitioned_parameters_never_silently_train_on_adamw_alone():
    """What DeepSpeed ZeRO-3 hands the factory (every parameter a 1-D partition): refused, even with the check skipped."""
    model = tiny_llama()
    for p in model.parameters():
        p.data = p.data.reshape(-1)
    with pytest.raises(optiplug.ConfigError, match=r"^muon: no trainable parameter reaches Muon \(all 21 are kept"):
        optiplug.get_entry("muon").build(optiplug.BuildContext(model=model), optiplug.get_entry("muon").config())


NO_MUON = (
    "muon: no trainable parameter reaches Muon (all {n} are kept on AdamW: not 2-D, embeddings, the output head, or "
    "matched by optimizer.adamw_patterns); train 2-D weight matrices (full fine-tuning, or unfreeze the attention/MLP "
    "projections), narrow optimizer.adamw_patterns, or use optimizer.name=adamw"
)


def test_no_parameter_reaching_muon_is_refused(tmp_path):
    model = tiny_llama()
    for name, p in model.named_parameters():
        p.requires_grad = "norm" in name or "embed" in name  # a freeze run of norms and embeddings only
    trainer = _trainer(tmp_path, model=model, max_steps=2)
    with pytest.raises(optiplug.ConfigError) as error:
        trainer.train()
    assert str(error.value) == NO_MUON.format(n=6)
    with pytest.raises(optiplug.ConfigError) as error:
        optiplug.build_optimizer(tiny_llama(), "muon", adamw_patterns=["proj"])
    assert str(error.value) == NO_MUON.format(n=21)


def test_a_partial_freeze_trains_only_the_unfrozen_matrices(tmp_path):
    model = tiny_llama()
    for name, p in model.named_parameters():
        p.requires_grad = ".layers.1." in name
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _trainer(tmp_path, model=model, max_steps=2)
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}
    muon = [p for g in trainer.optimizer.param_groups if g["use_muon"] for p in g["params"]]
    assert len(muon) == 7
