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
    trainer = _trainer(tmp_path, model=_lora_model(), max_steps=3)
    with pytest.raises(optiplug.ConfigError) as error:
        trainer.train()
    assert str(error.value) == LORA_REFUSAL
    assert trainer.state.global_step == 0 and not logged_losses(trainer)
    with pytest.raises(optiplug.ConfigError) as error:  # also outside a Trainer
        optiplug.build_optimizer(_lora_model(), "muon")
    assert str(error.value) == LORA_REFUSAL


FSDP1_REFUSAL = (
    "muon orthogonalizes each whole weight matrix, and FSDP version 1 flattens each unit's weights into one 1-D "
    "parameter; train with FSDP2 (fsdp_config.version: 2), DDP or a single process"
)


def _check(model=None, **arguments):
    """The entry's check with stand-in TrainingArguments (2 processes); the real ones run in the 2-process tests."""
    optimizer = arguments.pop("optimizer", {})
    args = SimpleNamespace(**{"deepspeed": None, "fsdp": None, "world_size": 2, "max_grad_norm": 0.0, **arguments})
    entry = optiplug.get_entry("muon")
    entry.check(optiplug.BuildContext(model=model or tiny_llama(), args=args), entry.config(**optimizer))


def test_fsdp2_is_allowed_and_fsdp1_refused():
    _check(fsdp="full_shard", fsdp_config={"version": 2})
    with pytest.raises(optiplug.ConfigError) as error:
        _check(fsdp="full_shard", fsdp_config={"version": 1})
    assert str(error.value) == FSDP1_REFUSAL


def _zero(stage: int, **zero) -> dict:
    return {"zero_optimization": {"stage": stage, **zero}, "gradient_clipping": "auto"}


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_deepspeed_zero_is_allowed_without_clipping(stage):
    _check(deepspeed=_zero(stage))


def test_deepspeed_zero3_is_allowed_without_reduce_scatter():
    _check(deepspeed=_zero(3, reduce_scatter=False))


def test_deepspeed_stage_0_clips_gradients_and_is_allowed_to():
    """Without ZeRO, DeepSpeed clips the gradients before the optimizer's step, as the Trainer does."""
    _check(deepspeed=_zero(0), max_grad_norm=1.0)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_clipping_after_newton_schulz_is_refused(stage):
    with pytest.raises(optiplug.ConfigError) as error:
        _check(deepspeed={**_zero(stage, reduce_scatter=False), "gradient_clipping": 0.5})
    assert str(error.value) == (
        f"muon under DeepSpeed ZeRO-{stage}: DeepSpeed clips after Newton–Schulz, on the norm of Muon's orthogonalized "
        "update (about sqrt(rows) per matrix), not of the gradient, so clipping at 0.5 would shrink every Muon step "
        "many times over: set max_grad_norm to 0 (and gradient_clipping in the DeepSpeed config, if it is a number)"
    )


def test_deepspeed_zero3_with_reduce_scatter_is_refused():
    with pytest.raises(optiplug.ConfigError, match=r'set "reduce_scatter": false in the DeepSpeed config'):
        _check(deepspeed=_zero(3))


def test_deepspeed_refuses_every_field_its_muon_fixes_in_one_sentence():
    optimizer = {"adjust_lr": "match_rms_adamw", "nesterov": False, "ns_steps": 6, "ns_eps": 1e-6,
                 "ns_coefficients": (3.0, -4.0, 2.0)}  # fmt: skip
    with pytest.raises(optiplug.ConfigError) as error:
        _check(deepspeed=_zero(2), optimizer=optimizer)
    assert str(error.value) == (
        "muon under DeepSpeed ZeRO-2 runs DeepSpeed's own Muon, which cannot honour adjust_lr 'match_rms_adamw' (its "
        "learning rate scale is sqrt(max(1, fan_out/fan_in))); nesterov False (its momentum is Nesterov's); ns_steps "
        "6 (it runs 5 Newton–Schulz steps); ns_coefficients (3.0, -4.0, 2.0) (its coefficients are (3.4445, -4.775, "
        "2.0315)); ns_eps 1e-06 (it divides by the norm plus 1e-7): leave these fields at the default, or train "
        "without DeepSpeed"
    )


def test_deepspeed_refuses_conv1d_matrices_whose_fans_it_reads_the_wrong_way_round():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(optiplug.ConfigError) as error:
        _check(model=gpt2, deepspeed=_zero(2))
    assert str(error.value) == (
        "muon under DeepSpeed ZeRO-2: 3 Muon matrices (transformer.h.0.attn.c_attn.weight, ...) are transformers "
        "Conv1D weights, stored as (fan_in, fan_out), and DeepSpeed's Muon scales each step by sqrt(rows/cols) as if "
        "it were (fan_out, fan_in), the wrong factor for these: train this model with muon without DeepSpeed, or keep "
        "them on AdamW with optimizer.adamw_patterns"
    )
    square_only = ["wte", "wpe", "lm_head", r"c_attn", r"mlp\.c_(fc|proj)"]  # attn.c_proj is 16 x 16: either way
    _check(model=gpt2, deepspeed=_zero(2), optimizer={"adamw_patterns": square_only})


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
    trainer = _trainer(tmp_path, model=model, max_steps=3)
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
    trainer = _trainer(tmp_path, model=model, max_steps=3)
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}
    muon = [p for g in trainer.optimizer.param_groups if g["use_muon"] for p in g["params"]]
    assert len(muon) == 7


def test_a_checkpoint_written_before_ns_dtype_resumes_at_its_default_and_refuses_another():
    from optiplug.app.safety import check_checkpoint

    checkpoint = Path(__file__).parents[3] / "tests" / "fixtures" / "old_checkpoints" / "muon" / "checkpoint-3"
    scheduler = optiplug.parse_scheduler({"name": "cosine", "warmup_steps": 1})
    check_checkpoint(str(checkpoint), optiplug.parse_optimizer("muon"), scheduler, engine=False)
    # read as this version reads it (safety._as_read_now): the field's default, which the old run did use
    with pytest.raises(optiplug.CheckpointError, match=r"optimizer\.ns_dtype='float32' \(checkpoint: 'bfloat16'\)"):
        check_checkpoint(str(checkpoint), optiplug.parse_optimizer({"name": "muon", "ns_dtype": "float32"}), scheduler,
                         engine=False)  # fmt: skip
