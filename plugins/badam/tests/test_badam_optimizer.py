"""The optimizers in a plain PyTorch loop: which block trains, what state is held, what a switch frees."""

from __future__ import annotations

import contextlib
import gc
import io
import weakref

import pytest
import torch
from optiplug_badam import state_bytes
from optiplug_badam.config import BAdamConfig
from optiplug_badam.optim import BlockAdamW, RatioAdam

import optiplug
from optiplug import optimizer_state_bytes, tensor_bytes
from optiplug.testing import TokenBlocks, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore:badam. .* never updated:UserWarning")

BATCH = torch.stack([TokenBlocks(n=4, distinct=4)[i]["input_ids"] for i in range(4)])


def step(model, optimizer) -> None:
    model(input_ids=BATCH, labels=BATCH).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if parts[1] == "layers" else None


def trainable_layers(model) -> set:
    return {layer_of(n) for n, p in model.named_parameters() if p.requires_grad}


def blocks_per_step(mode: str, steps: int, **fields) -> list[int]:
    model = tiny_llama(layers=3)
    optimizer = optiplug.build_optimizer(model, {"name": "badam", "switch_every": 2, "switch_mode": mode, **fields})
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    active = []
    for _ in range(steps):
        block, switches = optimizer.active_block, len(optimizer.switches)
        assert trainable_layers(model) == {block}
        step(model, optimizer)
        changed = {layer_of(n) for n, p in model.named_parameters() if not torch.equal(p.detach(), weights[n])}
        assert changed == {block}, "only the active block's weights change"
        if len(optimizer.switches) == switches:  # no switch at this step: the state is the block's own
            assert {id(p) for p in optimizer.base_optimizer.state} == {
                id(p) for n, p in model.named_parameters() if layer_of(n) == block
            }
        else:
            assert len(optimizer.base_optimizer.state) == 0
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        active.append(block)
    return active


# As in badam, the first block trains switch_every - 1 steps (its counter starts at 0), later blocks switch_every.
@pytest.mark.parametrize(
    ("mode", "fields", "expected"),
    [
        ("ascending", {}, [0, 1, 1, 2, 2, 0, 0]),
        ("descending", {}, [2, 1, 1, 0, 0, 2, 2]),
        ("ascending", {"start_block": 1}, [1, 2, 2, 0, 0, 1, 1]),
        ("fixed", {"start_block": 2}, [2, 2, 2, 2, 2, 2, 2]),
        ("fixed", {}, [0, 0, 0, 0, 0, 0, 0]),  # badam leaves the block unset here and fails
        ("ascending", {"switch_every": -1}, [0, 0, 0, 0, 0, 0, 0]),
    ],
)
def test_only_the_active_block_trains_and_blocks_follow_switch_mode(mode, fields, expected):
    assert blocks_per_step(mode, 7, **fields) == expected


def test_random_mode_visits_every_block_once_per_round():
    torch.manual_seed(3)
    active = blocks_per_step("random", 11)
    rounds = [active[0:1] + active[1:5:2], active[5:11:2]]
    assert [sorted(r) for r in rounds] == [[0, 1, 2], [0, 1, 2]]
    assert active[1] == active[2] and active[3] == active[4]


def test_weight_decay_skips_norms_and_biases():
    model = tiny_llama(layers=2)
    optimizer = optiplug.build_optimizer(model, {"name": "badam", "weight_decay": 0.1})
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = optimizer.base_optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in no_decay["params"]) == [
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
    ]
    assert all("norm" not in names[id(p)] for p in decay["params"]) and len(decay["params"]) == 7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_measured_state_equals_the_analytic_value(dtype):
    model = tiny_llama(layers=2).to(dtype)
    shapes = optiplug.ParamShape.of_model(model)
    optimizer = optiplug.build_optimizer(model, {"name": "badam"})
    step(model, optimizer)
    masters = optimizer.master_weights()
    assert len(masters) == (0 if dtype == torch.float32 else 9)  # a float32 weight is its own master copy
    assert optimizer_state_bytes(optimizer) == state_bytes(shapes, BAdamConfig())


def test_badam_holds_a_third_more_state_on_float32_weights():
    from badam import BlockOptimizer

    model = tiny_llama(layers=2)
    ours = optiplug.build_optimizer(model, {"name": "badam"})
    step(model, ours)
    reference_model = tiny_llama(layers=2)
    with contextlib.redirect_stdout(io.StringIO()), pytest.warns(UserWarning, match="BAdam expect model"):
        reference = BlockOptimizer(
            torch.optim.AdamW(reference_model.parameters(), weight_decay=0.0),
            list(reference_model.named_parameters()),
            switch_mode="ascending",
        )
        step(reference_model, reference)
    theirs = optimizer_state_bytes(reference) + tensor_bytes(list(reference.param_idx2hp.values()))
    mine = optimizer_state_bytes(ours)
    steps = 4 * 9  # one float32 `step` per parameter
    assert (theirs - steps) / (mine - steps) == 1.5


def test_a_switch_frees_the_previous_block_without_gc_collect():
    model = tiny_llama(layers=2).to(torch.bfloat16)
    optimizer = optiplug.build_optimizer(model, {"name": "badam", "switch_every": 3})
    gc.disable()
    try:
        step(model, optimizer)
        state = [t for s in optimizer.base_optimizer.state.values() for t in s.values()]
        held = [weakref.ref(t) for t in state + optimizer.master_weights()]
        del state
        assert len(held) == 4 * 9  # exp_avg, exp_avg_sq, step, master copy
        step(model, optimizer)  # the switch
        assert optimizer.active_block == 1
        assert all(ref() is None for ref in held)
    finally:
        gc.enable()


def test_release_and_attach():
    model = tiny_llama(layers=2)
    optimizer = optiplug.build_optimizer(model, {"name": "badam"})
    optimizer.release()
    assert all(p.requires_grad for p in model.parameters())
    optimizer.attach()
    assert trainable_layers(model) == {0}


def test_loading_a_state_it_did_not_write():
    model = tiny_llama(layers=2)
    optimizer = optiplug.build_optimizer(model, {"name": "badam"})
    step(model, optimizer)
    with pytest.raises(optiplug.CheckpointError) as error:
        optimizer.load_state_dict(optimizer.base_optimizer.state_dict())
    assert str(error.value) == (
        "badam: this optimizer state was not saved by optiplug-badam in mode 'layer'; resume with the optimizer "
        "and mode that wrote the checkpoint"
    )
    other = optiplug.build_optimizer(tiny_llama(layers=3), {"name": "badam"})
    with pytest.raises(optiplug.CheckpointError) as error:
        other.load_state_dict(optimizer.state_dict())
    assert str(error.value) == (
        "badam: the checkpoint was saved with 2 blocks and this run has 3: resume with the same model and optimizer.blocks"
    )


def test_ratio_state_loads_with_weights_only(tmp_path):
    model = tiny_llama(layers=2)
    optimizer = optiplug.build_optimizer(model, {"name": "badam", "mode": "ratio", "switch_every": 2})
    assert isinstance(optimizer, RatioAdam)
    for _ in range(3):  # the switch at step 2 leaves reset (empty) states behind
        step(model, optimizer)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    state = torch.load(tmp_path / "optimizer.pt", weights_only=True)
    assert state["badam"]["global_step"] == 3 and state["badam"]["masks"]
    fresh = optiplug.build_optimizer(tiny_llama(layers=2), {"name": "badam", "mode": "ratio", "switch_every": 2})
    fresh.load_state_dict(state)
    assert fresh.global_step == 3
    assert [fresh.sparse_dict[p]["offset"] for _, p in fresh.named_parameters_list] == state["badam"]["offsets"]


def test_lora_trains_only_the_active_blocks_adapters():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_llama(layers=2), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    )
    optimizer = optiplug.build_optimizer(model, {"name": "badam", "switch_every": 2})
    assert isinstance(optimizer, BlockAdamW) and optimizer.lora_mode
    assert optimizer.block_prefix_list == [["base_model.model.model.layers.0."], ["base_model.model.model.layers.1."]]
    for block in (0, 1):
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert len(trainable) == 4 and all(f"layers.{block}." in n and "lora_" in n for n in trainable)
        step(model, optimizer)


def test_ratio_mode_on_a_model_without_embedding_or_head():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    optimizer = optiplug.build_optimizer(model, {"name": "badam", "mode": "ratio", "update_ratio": 0.5})
    assert optimizer.frozen == []
    x = torch.randn(8, 16)
    model(x).square().mean().backward()
    optimizer.step()
    assert all(p.grad.is_sparse for p in model.parameters())
    optimizer.zero_grad()
    optimizer.release()
    model(x).square().mean().backward()
    assert not any(p.grad.is_sparse for p in model.parameters()), "release() removes the gradient hooks"


def test_grad_bytes_is_the_gradient_memory_of_the_active_block():
    import optiplug
    from optiplug.testing import TokenBlocks, tiny_llama

    model = tiny_llama()
    entry = optiplug.get_entry("badam")
    cfg = entry.config(switch_every=2)
    expected = entry.grad_bytes(optiplug.ParamShape.of_model(model), cfg)
    optimizer = optiplug.build_optimizer(model, cfg)
    batch = TokenBlocks(4)[0]
    model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss.backward()
    held = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    assert held == expected > 0  # the two layer blocks of the tiny Llama are the same size
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert expected < total / 2
    assert optimizer is not None
