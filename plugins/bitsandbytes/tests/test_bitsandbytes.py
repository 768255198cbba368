"""optiplug-bitsandbytes: estimates equal measured state, paged = unpaged on CPU, embeddings keep 32-bit state."""

from __future__ import annotations

import pytest

import optiplug
from optiplug.testing import TokenBlocks, tiny_llama

NAMES = ["bnb_adamw", "bnb_lion", "bnb_ademamix", "bnb_rmsprop"]


def _steps(model, optimizer, n: int = 3) -> list[float]:
    losses = []
    for i in range(n):
        block = TokenBlocks(n=4, seed=i)[0]
        loss = model(input_ids=block["input_ids"][None], labels=block["labels"][None]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("bits", [8, 32])
@pytest.mark.parametrize("name", NAMES)
def test_estimate_equals_measured_state(name, bits):
    model = tiny_llama(hidden=64)  # some parameters above min_8bit_size, some below, embeddings 8192 elements
    optimizer = optiplug.build_optimizer(model, name, bits=bits)
    _steps(model, optimizer, 2)
    cfg = optiplug.parse_optimizer(name, bits=bits)
    estimate = optiplug.get_entry(name).state_bytes(optiplug.ParamShape.of_model(model), cfg)
    assert estimate == optiplug.optimizer_state_bytes(optimizer)


@pytest.mark.parametrize("name", ["bnb_adamw", "bnb_lion", "bnb_ademamix"])
def test_paged_on_cpu_warns_and_takes_the_unpaged_steps(name):
    import torch

    unpaged_model, paged_model = tiny_llama(), tiny_llama()
    unpaged = _steps(unpaged_model, optiplug.build_optimizer(unpaged_model, name, bits=8))
    with pytest.warns(UserWarning, match="pages CUDA memory only"):
        optimizer = optiplug.build_optimizer(paged_model, name, bits=8, paged=True)
    assert optimizer.is_paged  # bitsandbytes' paged path ran, and fell back on the CPU
    assert _steps(paged_model, optimizer) == unpaged
    for a, b in zip(unpaged_model.parameters(), paged_model.parameters()):
        assert torch.equal(a, b)


@pytest.fixture
def an_override_left_behind():
    """What transformers' Trainer does with a bnb optimizer: a process-wide 32-bit override, here for every weight."""
    import bitsandbytes
    import torch

    other = tiny_llama(hidden=64)
    manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
    for module in other.modules():
        if isinstance(module, torch.nn.Linear):
            manager.register_module_override(module, "weight", {"optim_bits": 32})
    _steps(other, bitsandbytes.optim.AdamW8bit(other.parameters()), 1)  # the overrides now stand by index
    yield
    manager.initialize()  # the next test's process starts clean


def test_embeddings_keep_32bit_state_and_nothing_leaks_into_the_next_optimizer(an_override_left_behind):
    import torch

    model = tiny_llama(hidden=64)
    optimizer = optiplug.build_optimizer(model, "bnb_adamw", bits=8)
    _steps(model, optimizer, 1)
    state = {name: optimizer.state[p] for name, p in model.named_parameters()}
    assert state["model.embed_tokens.weight"]["state1"].dtype == torch.float32
    assert state["lm_head.weight"]["state1"].dtype == torch.uint8  # a Linear of the same size: 8-bit
    plain = optiplug.build_optimizer(model, "bnb_adamw", bits=8, embeddings_32bit=False)
    _steps(model, plain, 1)
    assert plain.state[model.model.embed_tokens.weight]["state1"].dtype == torch.uint8


def test_estimate_and_describe_say_which_parameters_are_8bit():
    model = tiny_llama(hidden=64)
    shapes = optiplug.ParamShape.of_model(model)
    line = optiplug.get_entry("bnb_adamw").describe(shapes, optiplug.parse_optimizer("bnb_adamw"))
    assert "8-bit blockwise" in line and "in 32 bits" in line


def test_rmsprop_has_no_paged_field():
    with pytest.raises(optiplug.ConfigError, match="paged: unknown field"):
        optiplug.parse_optimizer("bnb_rmsprop", paged=True)


def test_ademamix_betas_are_checked():
    with pytest.raises(optiplug.ConfigError, match="each beta must be in"):
        optiplug.parse_optimizer("bnb_ademamix", betas=(0.9, 0.999, 1.0))
