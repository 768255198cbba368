"""Registration, config errors, target selection, checks and analytic state sizes."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch

import optiplug
import optiplug.app
from optiplug.testing import TokenBlocks, tiny_llama

NAMES = ["galore_adafactor", "galore_adamw", "galore_adamw8bit"]


def test_registered_through_the_entry_point_without_importing_torch():
    code = (
        "import sys, optiplug; rows = {r.name: r.plugin for r in optiplug.list_optimizers()}; "
        "print(sorted(n for n in rows if n.startswith('galore')), rows['galore_adamw'], "
        "sorted(m for m in ('torch', 'galore_torch', 'bitsandbytes') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"{NAMES} optiplug-galore []"


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"rank": 0}, "optimizer.rank: Input should be greater than 0 (got 0)"),
        ({"update_proj_gap": -1}, "optimizer.update_proj_gap: Input should be greater than 0 (got -1)"),
        (
            {"proj_type": "both"},
            "optimizer.proj_type: Input should be 'std', 'reverse_std', 'right', 'left' or 'full' (got 'both')",
        ),
        ({"projection": "qr"}, "optimizer.projection: Input should be 'svd' or 'randomized' (got 'qr')"),
        (
            {"target_modules": []},
            "optimizer.target_modules: expected 'all-linear', a regex, or a non-empty list of module names",
        ),
        (
            {"target_modules": "(q|v_proj"},
            "optimizer.target_modules: not a valid regex: missing ), unterminated subpattern at position 0 "
            "(got '(q|v_proj')",
        ),
        ({"betas": [0.9, 1.0]}, "optimizer.betas.1: Input should be less than 1 (got 1.0)"),
        ({"ranks": 4}, "optimizer.ranks: unknown field; check the spelling (`optiplug show NAME` lists the fields)"),
    ],
)
def test_invalid_fields_are_one_line_each(fields, message):
    with pytest.raises(optiplug.ConfigError) as error:
        optiplug.app.RunConfig(optimizer={"name": "galore_adamw", **fields})
    assert str(error.value) == message


# ---- which weights are projected ------------------------------------------------------------


def _targets(targets):
    from optiplug import target_parameters

    return sorted({name.split(".")[-2] for name in target_parameters(tiny_llama(), targets)})


@pytest.mark.parametrize(
    "targets, expected",
    [
        ("all-linear", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
        (["attn"], ["k_proj", "o_proj", "q_proj", "v_proj"]),  # transformers' rule: an item occurring in the name
        (["mlp", "q_proj"], ["down_proj", "gate_proj", "q_proj", "up_proj"]),
        (r".*layers\.1\.self_attn\.(q|v)_proj", ["q_proj", "v_proj"]),
        (["lm_head"], ["lm_head"]),  # named explicitly, the output head is a target too
    ],
)
def test_target_modules_select_linear_weights(targets, expected):
    assert _targets(targets) == expected


def test_a_selection_matching_nothing_names_the_available_modules():
    with pytest.raises(optiplug.ConfigError) as error:
        _targets(["query_key_value"])
    assert str(error.value) == (
        "target_modules ['query_key_value'] matches no nn.Linear module; available: down_proj, gate_proj, "
        "k_proj, lm_head, o_proj, q_proj, up_proj, v_proj (or 'all-linear')"
    )
    with pytest.raises(optiplug.ConfigError) as error:
        _targets("embed_tokens")  # an nn.Embedding: only nn.Linear weights are projected
    assert str(error.value).startswith("target_modules 'embed_tokens' matches no nn.Linear module; available: ")


def test_a_selection_of_frozen_weights_only_is_refused():
    from optiplug import target_parameters

    model = tiny_llama()
    for name, param in model.named_parameters():
        param.requires_grad_("mlp" not in name)
    with pytest.raises(optiplug.ConfigError) as error:
        target_parameters(model, ["gate_proj"])
    assert str(error.value) == (
        "target_modules ['gate_proj'] selects only frozen weights (model.layers.0.mlp.gate_proj, "
        "model.layers.1.mlp.gate_proj); select trainable modules or unfreeze them"
    )


def test_parameter_groups_split_projected_decay_and_no_decay():
    optimizer = optiplug.build_optimizer(tiny_llama(), "galore_adamw", weight_decay=0.1, rank=4)
    groups = [(len(g["params"]), g["weight_decay"], g.get("rank")) for g in optimizer.param_groups]
    # embed + lm_head decay; 5 norms no decay; 14 projected linear weights
    assert groups == [(2, 0.1, None), (5, 0.0, None), (14, 0.1, 4)]


# ---- checks ---------------------------------------------------------------------------------


def _args(**fields):
    """TrainingArguments' fields the checks read. A stand-in because DeepSpeed, FSDP, several processes
    and fp16 cannot be set up on this CPU-only machine; the checks only read these attributes."""
    values = dict(
        deepspeed=None, fsdp=None, fsdp_config=None, world_size=1, fp16=False, gradient_accumulation_steps=1,
        max_grad_norm=1.0,
    )  # fmt: skip
    values.update(fields)
    return types.SimpleNamespace(**values)


@pytest.mark.parametrize(
    "name, fields, args, message",
    [
        (
            "galore_adamw",
            {},
            {"deepspeed": {"zero_optimization": {"stage": 2}}},
            "galore_adamw projects whole weight matrices, and DeepSpeed (ZeRO stage 2) hands the optimizer flattened "
            "1-D partitions of the weights, cut at arbitrary elements; train with FSDP2 (fsdp_config.version: 2), DDP "
            "or a single process",
        ),
        (
            "galore_adamw",
            {},
            {"fsdp": "full_shard", "fsdp_config": {"version": 1}},
            "galore_adamw projects whole weight matrices, and FSDP version 1 flattens each unit's weights into one 1-D "
            "parameter; train with FSDP2 (fsdp_config.version: 2), DDP or a single process",
        ),
        (
            "galore_adafactor",
            {},
            {"fsdp": "full_shard"},
            "galore_adafactor projects whole weight matrices, which FSDP splits into row shards across the processes; "
            "train with galore_adamw under FSDP2, DDP or a single process",
        ),
        (
            "galore_adamw8bit",
            {},
            {"deepspeed": {"zero_optimization": {"stage": 3}}},
            "galore_adamw8bit projects whole weight matrices, and DeepSpeed (ZeRO stage 3) hands the optimizer "
            "flattened 1-D partitions of the weights, cut at arbitrary elements; train with galore_adamw under FSDP2, "
            "DDP or a single process",
        ),
        (
            "galore_adamw",
            {"layerwise": True},
            {"world_size": 2},
            "galore_adamw with layerwise: true steps each parameter during backward, before DDP has averaged its "
            "gradient across the 2 processes; set layerwise: false for distributed training",
        ),
        (
            "galore_adamw8bit",
            {"layerwise": True},
            {"fp16": True},
            "galore_adamw8bit with layerwise: true cannot train in fp16, whose loss scaling unscales gradients only "
            "after backward; use bf16 or set layerwise: false",
        ),
        (
            "galore_adamw",
            {"target_modules": ["qkv"]},
            {},
            "target_modules ['qkv'] matches no nn.Linear module; available: down_proj, gate_proj, k_proj, lm_head, "
            "o_proj, q_proj, up_proj, v_proj (or 'all-linear')",
        ),
    ],
)
def test_check_refuses_with_one_sentence(name, fields, args, message):
    from optiplug.factory import build_from_entry

    entry = optiplug.get_entry(name)
    cfg = optiplug.app.RunConfig(optimizer={"name": name, **fields}).optimizer
    with pytest.raises(optiplug.ConfigError) as error:  # the entry's check, then the core's (layerwise: true)
        build_from_entry(entry, optiplug.BuildContext(model=tiny_llama(), args=_args(**args)), cfg)
    assert str(error.value) == message


def test_check_accepts_ddp_without_layerwise_fsdp2_and_bf16_layerwise():
    entry = optiplug.get_entry("galore_adamw")
    entry.check(optiplug.BuildContext(model=tiny_llama(), args=_args(world_size=2)), entry.config())
    fsdp2 = _args(world_size=2, fsdp="full_shard", fsdp_config={"version": 2})
    entry.check(optiplug.BuildContext(model=tiny_llama(), args=fsdp2), entry.config())
    entry.check(optiplug.BuildContext(model=tiny_llama(), args=_args(bf16=True)), entry.config(layerwise=True))


def test_check_refuses_a_peft_adapter_model():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name in NAMES:
        entry = optiplug.get_entry(name)
        with pytest.raises(optiplug.ConfigError) as error:
            entry.check(optiplug.BuildContext(model=model), entry.config())
        assert str(error.value) == (
            f"{name} trains full weight matrices through low-rank projections, and the model is a PEFT adapter "
            f"model whose trainable weights are already low-rank; use adamw for adapters"
        )


# ---- analytic state size == what the optimizer really holds ---------------------------------


@pytest.mark.parametrize(
    "fields, dtype",
    [
        ({"name": "galore_adamw", "rank": 4, "proj_type": "full"}, torch.float32),
        ({"name": "galore_adamw", "rank": 4, "proj_type": "reverse_std", "target_modules": ["mlp"]}, torch.float32),
        ({"name": "galore_adamw", "rank": 8}, torch.bfloat16),
        ({"name": "galore_adafactor", "rank": 4, "beta1": 0.9}, torch.bfloat16),
        ({"name": "galore_adafactor", "rank": 6, "proj_type": "left"}, torch.float32),
        ({"name": "galore_adamw8bit", "rank": 4, "min_8bit_size": 100}, torch.float32),
    ],
    ids=["adamw-full", "adamw-reverse-mlp", "adamw-bf16", "adafactor-beta1-bf16", "adafactor-left", "8bit"],
)
def test_state_bytes_equals_the_measured_state(fields, dtype):
    from optiplug import optimizer_state_bytes

    model = tiny_llama().to(dtype)
    cfg = optiplug.app.RunConfig(optimizer=fields).optimizer
    optimizer = optiplug.build_optimizer(model, cfg)
    data = TokenBlocks(n=4)
    batch = torch.stack([data[i]["input_ids"] for i in range(4)])
    for _ in range(2):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    expected = optiplug.get_entry(cfg.name).state_bytes(optiplug.ParamShape.of_model(model), cfg)
    assert optimizer_state_bytes(optimizer) == expected


def test_8bit_state_ignores_overrides_another_optimizer_left_in_bitsandbytes():
    """transformers leaves process-wide 32-bit overrides by (group, index): they must not reach galore_adamw8bit."""
    import bitsandbytes

    from optiplug import optimizer_state_bytes

    def two_steps(model, optimizer):
        batch = torch.stack([TokenBlocks(n=4)[i]["input_ids"] for i in range(4)])
        for _ in range(2):
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    cfg = optiplug.app.RunConfig(optimizer={"name": "galore_adamw8bit", "rank": 4, "min_8bit_size": 100}).optimizer
    clean = tiny_llama()
    expected = optiplug.get_entry(cfg.name).state_bytes(optiplug.ParamShape.of_model(clean), cfg)
    other, manager = tiny_llama(), bitsandbytes.optim.GlobalOptimManager.get_instance()
    try:
        for module in other.modules():
            if isinstance(module, torch.nn.Linear):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
        two_steps(other, bitsandbytes.optim.AdamW8bit(other.parameters()))
        optimizer = optiplug.build_optimizer(clean, cfg)
        two_steps(clean, optimizer)
        assert optimizer_state_bytes(optimizer) == expected
    finally:
        manager.initialize()
