"""optiplug-torchao: estimates equal measured state; the state dict is weights_only-safe and round-trips."""

from __future__ import annotations

import io

import pytest

import optiplug
from optiplug.testing import TokenBlocks, tiny_llama

NAMES = ["torchao_adamw8bit", "torchao_adamw4bit", "torchao_adamwfp8"]


def _step(model, optimizer, seed: int = 0) -> None:
    block = TokenBlocks(n=4, seed=seed)[0]
    model(input_ids=block["input_ids"][None], labels=block["labels"][None]).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.slow  # torchao compiles each parameter shape's update (tens of seconds per process)
@pytest.mark.parametrize("name", NAMES)
def test_estimate_equals_measured_and_the_state_round_trips_weights_only(name):
    import torch

    model = tiny_llama(hidden=64)  # 8192-element matrices are quantized, the norms are not
    optimizer = optiplug.build_optimizer(model, name)
    _step(model, optimizer)
    cfg = optiplug.parse_optimizer(name)
    estimate = optiplug.get_entry(name).state_bytes(optiplug.ParamShape.of_model(model), cfg)
    assert estimate == optiplug.optimizer_state_bytes(optimizer)

    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    twin = tiny_llama(hidden=64)
    twin.load_state_dict(model.state_dict())
    resumed = optiplug.build_optimizer(twin, name)
    resumed.load_state_dict(saved)
    quantized = [v for s in resumed.state.values() for v in s.values() if type(v).__name__.startswith("OptimState")]
    assert quantized, "the quantized moments come back as torchao's state tensors"
    _step(model, optimizer, seed=1)
    _step(twin, resumed, seed=1)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_a_state_dict_naming_another_format_is_refused():
    from optiplug_torchao.optim import FORMAT_KEY, unpack

    with pytest.raises(optiplug.CheckpointError, match="'pickle' is not one optiplug-torchao writes"):
        unpack({FORMAT_KEY: "pickle", "attributes": []})


def test_block_size_must_be_even():
    with pytest.raises(optiplug.ConfigError, match="block_size must be even"):
        optiplug.parse_optimizer("torchao_adamw4bit", block_size=127)
