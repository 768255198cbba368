"""The muon config, the routing rule on bare shapes and the analytic state size: pure Python, no training."""

from __future__ import annotations

import subprocess
import sys

import pytest
from optiplug_muon import MuonConfig, Routing, entries
from optiplug_muon.routing import ADAMW, MUON, destination, fans
from pydantic import ValidationError

import optiplug

PATTERNS = MuonConfig().adamw_patterns


def shape(name: str, dims: tuple[int, ...], module: str = "Linear", itemsize: int = 4) -> optiplug.ParamShape:
    return optiplug.ParamShape(name, dims, itemsize, module)


LLAMA = [
    shape("model.embed_tokens.weight", (2048, 128), "Embedding"),
    shape("model.layers.0.self_attn.q_proj.weight", (128, 128)),
    shape("model.layers.0.mlp.gate_proj.weight", (384, 128)),
    shape("model.layers.0.mlp.down_proj.weight", (128, 384)),
    shape("model.layers.0.input_layernorm.weight", (128,), "LlamaRMSNorm"),
    shape("model.norm.weight", (128,), "LlamaRMSNorm"),
    shape("lm_head.weight", (2048, 128)),
]


def test_registered_through_the_entry_point_without_importing_torch():
    code = (
        "import sys, optiplug\n"
        "row = [r for r in optiplug.list_optimizers() if r.name == 'muon'][0]\n"
        "print(row.plugin, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["optiplug-muon", "False", "False"]


def test_defaults():
    cfg = optiplug.get_entry("muon").config()
    assert (cfg.lr, cfg.momentum, cfg.nesterov, cfg.ns_steps, cfg.adjust_lr) == (0.02, 0.95, True, 5, "original")
    assert (cfg.adamw_lr, cfg.adamw_betas, cfg.weight_decay, cfg.kernel) == (3e-2, (0.9, 0.95), 0.0, "auto")
    import inspect

    import torch

    torch_defaults = {k: p.default for k, p in inspect.signature(torch.optim.Muon.__init__).parameters.items()}
    assert (cfg.ns_coefficients, cfg.momentum, cfg.nesterov, cfg.ns_steps) == tuple(
        torch_defaults[k] for k in ("ns_coefficients", "momentum", "nesterov", "ns_steps")
    )  # torch.optim.Muon's own defaults, read from torch, not copied


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"lr": 0}, "lr"),
        ({"adamw_lr": -1e-3}, "adamw_lr"),
        ({"adamw_betas": (0.9, 1.0)}, "adamw_betas"),
        ({"momentum": 1.0}, "momentum"),
        ({"adjust_lr": "rms"}, "adjust_lr"),
        ({"ns_steps": 0}, "ns_steps"),
        ({"adamw_patterns": ["embed", ""]}, "adamw_patterns"),
        ({"adamw_patterns": ["lm_head("]}, "adamw_patterns"),
        ({"betas": (0.9, 0.95)}, "betas"),  # the AdamW side's are adamw_betas: a typo is an error, not a default
    ],
)
def test_invalid_fields_are_refused(fields, where):
    with pytest.raises(ValidationError) as error:
        MuonConfig(**fields)
    assert error.value.errors()[0]["loc"][0] == where


def test_routing_of_llama_names():
    route = Routing.of(LLAMA, PATTERNS)
    assert [s.name for s in route.muon] == [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
    ]
    assert destination(LLAMA[0], PATTERNS) == (ADAMW, "embedding")
    assert destination(LLAMA[4], PATTERNS) == (ADAMW, "1-D")
    assert destination(LLAMA[-1], PATTERNS) == (ADAMW, r"matches '(^|\\.)lm_head\\.'")
    assert destination(LLAMA[-1], (), heads={"lm_head.weight"}) == (ADAMW, "output head")
    assert destination(LLAMA[1], PATTERNS) == (MUON, "2-D hidden matrix")


@pytest.mark.parametrize(
    "name",
    [
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "gpt_neox.embed_in.weight",
        "embed_out.weight",
        "transformer.word_embeddings.weight",
        "model.decoder.embed_positions.weight",
        "score.weight",
        "classifier.out_proj.weight",
    ],
)
def test_default_patterns_keep_gpt_and_head_names_on_adamw_even_when_not_an_embedding_module(name):
    assert destination(shape(name, (64, 32)), PATTERNS)[0] == ADAMW


def test_patterns_do_not_catch_hidden_matrices_by_accident():
    for name in [
        "transformer.h.0.attn.c_attn.weight",
        "model.layers.3.mlp.up_proj.weight",
        "encoder.layer.0.output.dense.weight",
    ]:
        assert destination(shape(name, (64, 32)), PATTERNS)[0] == MUON, name


def test_conv1d_fans_are_read_transposed():
    assert fans("Linear", (384, 128)) == (384, 128)
    assert fans("Conv1D", (128, 384)) == (384, 128)  # GPT-2 c_fc: stored (fan_in, fan_out)


def test_summary_line():
    route = Routing.of(LLAMA, PATTERNS)
    assert route.summary() == "muon: 3 matrices (0.11M parameters) · adamw: 4 tensors (0.52M)"
    assert Routing.of(LLAMA[1:2], PATTERNS).summary() == "muon: 1 matrix (0.02M parameters) · adamw: 0 tensors (0.00M)"


@pytest.mark.parametrize("itemsize", [4, 2])
def test_state_bytes_is_one_buffer_per_muon_matrix_and_two_plus_a_step_per_adamw_tensor(itemsize):
    shapes = [optiplug.ParamShape(s.name, s.shape, itemsize, s.module_type) for s in LLAMA]
    muon = (128 * 128 + 384 * 128 + 128 * 384) * itemsize  # no step counter: torch's Muon keeps none
    adamw = 2 * (2048 * 128 + 128 + 128 + 2048 * 128) * itemsize + 4 * optiplug.STEP_BYTES
    assert entries.state_bytes(shapes, MuonConfig()) == muon + adamw
    # every tensor on AdamW when the patterns say so: exactly AdamW's state
    assert entries.state_bytes(shapes, MuonConfig(adamw_patterns=(".",))) == optiplug.adam_state_bytes(shapes)


def test_estimate_says_what_goes_where():
    from optiplug.app.estimate import estimate

    [row] = estimate(None, ["muon"])
    assert row.detail == "muon: 14 matrices (0.43M parameters) · adamw: 6 tensors (0.26M)"
