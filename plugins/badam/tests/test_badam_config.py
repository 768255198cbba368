"""The badam config, block planning and analytic state size: pure Python, no training."""

from __future__ import annotations

import subprocess
import sys

import pytest
from optiplug_badam import state_bytes
from optiplug_badam.blocks import infer_blocks, plan_blocks

import optiplug
from optiplug.registry import parse_optimizer

LLAMA = [
    "model.embed_tokens.weight",
    *[
        f"model.layers.{i}.{part}"
        for i in range(3)
        for part in ("self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight")
    ],
    "model.norm.weight",
    "lm_head.weight",
]


def test_registered_through_the_entry_point_without_importing_torch():
    code = (
        "import sys, optiplug\n"
        "row = [r for r in optiplug.list_optimizers() if r.name == 'badam'][0]\n"
        "print(row.plugin, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["optiplug-badam", "False", "False"]


def test_defaults():
    cfg = parse_optimizer("badam")
    assert (cfg.mode, cfg.switch_mode, cfg.switch_every, cfg.lr, cfg.weight_decay) == (
        "layer",
        "ascending",
        50,
        1e-3,
        0.0,
    )
    assert cfg.blocks is None and cfg.active_modules == ()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"mode": "ratio", "switch_mode": "random"}, "switch_mode is only used with mode 'layer' (mode is 'ratio')"),
        (
            {"mode": "ratio", "blocks": [["x"]], "start_block": 0},
            "start_block, blocks are only used with mode 'layer' (mode is 'ratio')",
        ),
        ({"update_ratio": 0.2}, "update_ratio is only used with mode 'ratio' (mode is 'layer')"),
        (
            {"mode": "ratio", "weight_decay": 0.1},
            "mode 'ratio' applies no weight decay (badam's sparse Adam has none): set weight_decay to 0",
        ),
        ({"switch_every": 0}, "switch_every must be a positive number of steps or -1 (never), got 0"),
        ({"switch_every": -2}, "switch_every must be a positive number of steps or -1 (never), got -2"),
        (
            {"switch_mode": "random", "start_block": 1},
            "start_block cannot be combined with switch_mode 'random' (the order is drawn at random)",
        ),
        ({"blocks": []}, "blocks must be a non-empty list of non-empty lists of parameter-name prefixes"),
        (
            {"blocks": [["model.layers.0."], []]},
            "blocks must be a non-empty list of non-empty lists of parameter-name prefixes",
        ),
        (
            {"blocks": [["model.layers.0.", ""]]},
            "blocks must not contain empty prefixes (an empty string matches every parameter)",
        ),
        (
            {"blocks": [["a"]], "include_lm_head": True},
            "include_lm_head only shapes the inferred blocks; with explicit blocks, list the parameters",
        ),
        ({"active_modules": [""]}, "active_modules must not contain empty prefixes"),
        ({"betas": [0.9, 1.0]}, "betas.1: Input should be less than 1 (got 1.0)"),
        (
            {"mask_mode": "diagonal", "mode": "ratio"},
            "mask_mode: Input should be 'adjacent' or 'scatter' (got 'diagonal')",
        ),
    ],
)
def test_config_errors(fields, message):
    with pytest.raises(optiplug.ConfigError) as error:
        parse_optimizer({"name": "badam", **fields})
    assert str(error.value) == f"optimizer: {message}" or str(error.value) == f"optimizer.{message}"


def test_inferred_blocks_follow_badam_on_llama_names():
    assert infer_blocks(LLAMA, False, False) == [["model.layers.0."], ["model.layers.1."], ["model.layers.2."]]
    assert infer_blocks(LLAMA, True, True) == [
        ["model.embed_tokens."],
        ["model.layers.0."],
        ["model.layers.1."],
        ["model.layers.2."],
        ["model.norm.weight", "lm_head.weight"],  # badam would put the embedding here too
    ]


def test_inferred_blocks_on_peft_and_gpt2_names():
    peft = [
        f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.default.weight" for i in range(2) for ab in "AB"
    ]
    assert infer_blocks(peft, False, False) == [
        ["base_model.model.model.layers.0."],
        ["base_model.model.model.layers.1."],
    ]
    gpt2 = [
        "transformer.wte.weight",
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.1.mlp.c_fc.weight",
        "transformer.ln_f.weight",
    ]
    assert infer_blocks(gpt2, False, True) == [
        ["transformer.h.0."],
        ["transformer.h.1."],
        ["transformer.wte.weight", "transformer.ln_f.weight"],
    ]


def test_plan_names_what_is_never_trained():
    plan = plan_blocks(LLAMA, parse_optimizer("badam"))
    assert plan.never_trained == ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    plan = plan_blocks(
        LLAMA,
        parse_optimizer({"name": "badam", "include_embedding": True, "active_modules": ["lm_head", "model.norm."]}),
    )
    assert plan.never_trained == [] and len(plan.blocks) == 4


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"blocks": [["model.layers.0."], ["model.layer.1."]]},
            "badam: optimizer.blocks[1] ['model.layer.1.'] matches no trainable parameter; names look like: "
            "model.embed_tokens.weight, model.layers.0.self_attn.q_proj.weight, model.layers.0.mlp.up_proj.weight, "
            "model.layers.0.input_layernorm.weight, model.layers.1.self_attn.q_proj.weight, "
            "model.layers.1.mlp.up_proj.weight, model.layers.1.input_layernorm.weight, "
            "model.layers.2.self_attn.q_proj.weight, ... (12 in all)",
        ),
        ({"start_block": 3}, "badam: optimizer.start_block is 3 but there are 3 blocks (0 to 2)"),
    ],
)
def test_plan_errors(fields, message):
    with pytest.raises(optiplug.ConfigError) as error:
        plan_blocks(LLAMA, parse_optimizer({"name": "badam", **fields}))
    assert str(error.value) == message


def test_plan_without_numbered_layers():
    with pytest.raises(optiplug.ConfigError) as error:
        plan_blocks(["encoder.weight", "decoder.weight"], parse_optimizer("badam"))
    assert str(error.value) == (
        "badam: no numbered layers found in the trainable parameter names (encoder.weight, decoder.weight): "
        "list the blocks in optimizer.blocks"
    )


def test_active_module_matching_nothing():
    with pytest.raises(optiplug.ConfigError) as error:
        plan_blocks(LLAMA, parse_optimizer({"name": "badam", "active_modules": ["heads"]}))
    assert str(error.value).startswith("badam: optimizer.active_modules entry 'heads' matches no trainable parameter")


def test_analytic_state_bytes():
    shapes = [optiplug.ParamShape(name, (10, 10) if "norm" not in name else (10,), 4, "") for name in LLAMA]
    layer = 2 * 100 + 10  # elements of one layer
    assert state_bytes(shapes, parse_optimizer("badam")) == 8 * layer + 3 * 4
    bf16 = [optiplug.ParamShape(s.name, s.shape, 2, "") for s in shapes]
    assert state_bytes(bf16, parse_optimizer("badam")) == 12 * layer + 3 * 4  # fp32 moments + fp32 master
    ratio = parse_optimizer({"name": "badam", "mode": "ratio", "update_ratio": 0.25})
    trained = [s for s in shapes if s.name not in ("model.embed_tokens.weight", "lm_head.weight")]
    assert state_bytes(shapes, ratio) == sum(2 * int(s.numel * 0.25) * 4 for s in trained)
