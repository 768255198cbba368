"""APOLLO inside transformers' Trainer: parity with transformers' optim="apollo_adamw", resume, state size, checks."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

import optiplug
import optiplug.app
from optiplug.testing import TokenBlocks, logged_losses, tiny_llama, training_args

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _apollo(**fields):
    return {"name": "apollo_adamw", "rank": 8, "update_proj_gap": 3, "lr": 3e-3, **fields}


def _trainer(output_dir, optimizer, hidden=64, **args):
    return optiplug.OptiTrainer(
        model=tiny_llama(hidden=hidden),
        args=training_args(output_dir, **args),
        train_dataset=TokenBlocks(n=64),
        optimizer=optimizer,
        scheduler={"name": "cosine", "warmup_steps": 2},
    )


def _history(trainer, key):
    return [h[key] for h in trainer.state.log_history if "loss" in h]


SETTINGS = [
    pytest.param({"proj": "random", "scale_type": "channel", "scale": 1.0}, id="random-channel"),
    pytest.param({"proj": "random", "scale_type": "tensor", "rank": 1, "scale": 128.0}, id="mini"),
    pytest.param({"proj": "svd", "scale_type": "channel", "scale": 2.0}, id="svd-channel"),
]


@pytest.mark.parametrize("settings", SETTINGS)
def test_losses_equal_transformers_exactly(tmp_path, settings):
    from transformers import Trainer

    fields = {"rank": 8, "update_proj_gap": 3, "proj_type": "std", **settings}
    # transformers gives the non-projected group apollo-torch's own eps (1e-6), the projected one adam_epsilon:
    # equal here, so both runs take the same settings. It applies no weight decay at all (optiplug's default 0).
    reference = Trainer(
        model=tiny_llama(hidden=64),
        args=training_args(
            tmp_path / "transformers",
            max_steps=8,
            learning_rate=3e-3,
            adam_epsilon=1e-6,
            optim="apollo_adamw",
            optim_target_modules=LINEAR,
            optim_args=",".join(f"{key}={value}" for key, value in fields.items()),
        ),
        train_dataset=TokenBlocks(n=64),
    )
    reference.train()
    ours = optiplug.OptiTrainer(
        model=tiny_llama(hidden=64),
        args=training_args(tmp_path / "optiplug", max_steps=8, learning_rate=3e-3),
        train_dataset=TokenBlocks(n=64),
        optimizer={"name": "apollo_adamw", "target_modules": LINEAR, "lr": 3e-3, **fields},
    )
    ours.train()
    assert logged_losses(ours) == logged_losses(reference)
    assert _history(ours, "grad_norm") == _history(reference, "grad_norm")


@pytest.mark.parametrize("name", ["apollo_adamw", "apollo_mini"])
def test_resume_between_two_projection_draws_is_exact(tmp_path, name):
    # projections drawn at steps 0, 3, 6: the checkpoint at step 4 holds the one drawn at step 3 and the next seed
    optimizer = _apollo(name=name) if name == "apollo_adamw" else {"name": name, "update_proj_gap": 3, "lr": 3e-3}
    full = _trainer(tmp_path / "full", optimizer, max_steps=8, save_strategy="steps", save_steps=4)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-4"
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    resumed = _trainer(tmp_path / "resumed", optimizer, max_steps=8)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    after = {s: loss for s, loss in logged_losses(resumed).items() if s > 4}
    reference = {s: loss for s, loss in logged_losses(full).items() if s > 4}
    assert after == reference and sorted(after) == [5, 6, 7, 8]
    projected = [s for s in state["state"].values() if "proj" in s]
    assert len(projected) == 2 * 7 and all(s["step"] == 4 and isinstance(s["seed"], int) for s in projected)
    assert len(state["state"]) == len(list(tiny_llama(hidden=64).parameters()))


CONFIGS = [
    pytest.param({}, id="default"),
    pytest.param({"name": "apollo_mini"}, id="mini"),
    pytest.param({"proj": "svd", "proj_type": "reverse_std"}, id="svd-reverse"),
    pytest.param({"rank": 100, "norm_growth_limiter": False}, id="rank-capped-no-limiter"),
    pytest.param({"target_modules": ["mlp"], "proj_type": "left"}, id="mlp-left"),
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("fields", CONFIGS)
def test_state_bytes_equal_the_measured_state(fields, dtype):
    model = tiny_llama(hidden=64).to(getattr(torch, dtype))
    cfg = optiplug.app.RunConfig(optimizer={"name": "apollo_adamw", **fields}).optimizer
    entry = optiplug.get_entry(cfg.name)
    optimizer = entry.build(optiplug.BuildContext(model=model), cfg)
    batch = TokenBlocks(n=4)[0]["input_ids"][None]
    for _ in range(2):  # the limiter's norm appears at the first step, moments and projections too
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    measured = optiplug.optimizer_state_bytes(optimizer)
    assert measured > 0
    assert entry.state_bytes(optiplug.ParamShape.of_model(model), cfg) == measured


def test_apollo_mini_state_is_near_sgd():
    """APOLLO's headline: rank 1 keeps the targeted weights' state at a few vectors each."""
    model = tiny_llama(hidden=64)
    shapes = optiplug.ParamShape.of_model(model)
    mini = optiplug.get_entry("apollo_mini")
    adamw_bytes = optiplug.adam_state_bytes(shapes)
    targeted = sum(s.numel * s.itemsize for s in shapes if s.module_type == "Linear" and "lm_head" not in s.name)
    mini_bytes = mini.state_bytes(shapes, mini.config())
    assert mini_bytes < adamw_bytes - 1.9 * targeted  # the two full-size moments of every targeted weight are gone


def test_defaults_are_transformers_and_apollo_mini_is_the_rank_one_tensor_preset():
    apollo = optiplug.get_entry("apollo_adamw").config()
    assert (apollo.rank, apollo.scale, apollo.update_proj_gap, apollo.proj, apollo.scale_type, apollo.proj_type) == (
        128,
        1.0,
        200,
        "random",
        "channel",
        "std",
    )
    assert (apollo.eps, apollo.scale_front, apollo.norm_growth_limiter) == (1e-6, False, True)
    mini = optiplug.get_entry("apollo_mini").config()
    assert (mini.rank, mini.scale_type, mini.scale) == (1, "tensor", 128.0)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"rank": 0}, "rank"),
        ({"proj": "qr"}, "proj"),
        ({"scale_type": "row"}, "scale_type"),
        ({"proj_type": "full"}, "proj_type"),
        ({"target_modules": "["}, "not a valid regex"),
        ({"target_modules": []}, "non-empty list"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"scale": 0}, "scale"),
    ],
)
def test_invalid_fields_are_refused(fields, message):
    with pytest.raises(optiplug.ConfigError, match=message):
        optiplug.app.RunConfig(optimizer={"name": "apollo_adamw", **fields})


def _args(**fields):
    """TrainingArguments' fields the checks read: a stand-in, as DeepSpeed and FSDP cannot be set up on a CPU."""
    values = dict(
        deepspeed=None, fsdp=None, fsdp_config=None, world_size=1, fp16=False, gradient_accumulation_steps=1,
        max_grad_norm=1.0,
    )  # fmt: skip
    return types.SimpleNamespace(**{**values, **fields})


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        (
            "apollo_adamw",
            {"deepspeed": {"zero_optimization": {"stage": 2}}},
            "apollo_adamw projects whole weight matrices and scales their rows or columns, and DeepSpeed (ZeRO stage "
            "2) hands the optimizer flattened 1-D partitions of the weights, cut at arbitrary elements; train with "
            "FSDP2 (fsdp_config.version: 2), DDP or a single process",
        ),
        (
            "apollo_mini",
            {"fsdp": "full_shard", "fsdp_config": {"version": 1}},
            "apollo_mini projects whole weight matrices and scales their rows or columns, and FSDP version 1 flattens "
            "each unit's weights into one 1-D parameter; train with FSDP2 (fsdp_config.version: 2), DDP or a single "
            "process",
        ),
    ],
)
def test_check_refuses_sharded_engines_with_one_sentence(name, args, message):
    entry = optiplug.get_entry(name)
    with pytest.raises(optiplug.ConfigError) as error:
        entry.check(optiplug.BuildContext(model=tiny_llama(), args=_args(**args)), entry.config())
    assert str(error.value) == message
    entry.check(optiplug.BuildContext(model=tiny_llama(), args=_args(world_size=2)), entry.config())  # DDP is fine
    fsdp2 = _args(world_size=2, fsdp="full_shard", fsdp_config={"version": 2})
    entry.check(optiplug.BuildContext(model=tiny_llama(), args=fsdp2), entry.config())  # so is FSDP2


def test_check_refuses_targets_that_select_nothing_trainable():
    model = tiny_llama()
    entry = optiplug.get_entry("apollo_adamw")
    with pytest.raises(optiplug.ConfigError, match=r"matches no nn.Linear module; available: .*q_proj"):
        entry.check(optiplug.BuildContext(model=model), entry.config(target_modules="nothing_here"))
    for param in model.model.layers.parameters():
        param.requires_grad_(False)
    with pytest.raises(optiplug.ConfigError, match="only frozen weights"):
        entry.check(optiplug.BuildContext(model=model), entry.config(target_modules=["mlp"]))


def test_the_examples_are_valid_configs():
    root = Path(__file__).resolve().parents[3] / "examples"
    assert optiplug.app.load_config(root / "apollo.yaml").optimizer.name == "apollo_adamw"
    mini = optiplug.app.load_config(root / "apollo-mini.yaml").optimizer
    assert (mini.name, mini.rank, mini.scale_type) == ("apollo_mini", 1, "tensor")


def test_importing_the_plugin_and_listing_import_no_torch():
    import subprocess
    import sys

    code = (
        "import sys, optiplug, optiplug_apollo\n"
        "names = {row.name for row in optiplug.list_optimizers()}\n"
        "assert {'apollo_adamw', 'apollo_mini'} <= names, names\n"
        "assert 'torch' not in sys.modules and 'apollo_torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_param_groups_by_name_reach_the_plain_and_the_apollo_parts():
    model = tiny_llama(hidden=64)
    optimizer = optiplug.build_optimizer(
        model,
        "apollo_adamw",
        rank=8,
        lr=1e-2,
        param_groups=[{"match": "embed_tokens", "lr_scale": 0.1}, {"match": "mlp", "lr": 3e-3}],
    )
    by_label: dict[str, list[dict]] = {}
    for group in optimizer.param_groups:
        by_label.setdefault(group["optiplug_group"], []).append(group)  # the label the core sets
    assert [g["lr"] for g in by_label["embed_tokens"]] == [pytest.approx(1e-3)]
    assert all(g["lr"] == 3e-3 and g["rank"] == 8 for g in by_label["mlp"])  # the MLP weights stay APOLLO's
    assert any("rank" in g and g["lr"] == 1e-2 for g in by_label["default"])  # attention: default rate
