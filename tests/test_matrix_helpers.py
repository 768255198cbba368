"""The matrix-optimizer helpers of the contract: group splitting, the shared refusal, projection shapes,
the per-parameter step base and the whole-matrix base in one process (the sharded step: test_sharded.py)."""

from __future__ import annotations

import types

import pytest
import torch

import optiplug
from optiplug.sharded import assign_owners, chunk_sizes
from optiplug.testing import tiny_llama

# ---- split_param_groups ----------------------------------------------------------------------


def test_split_param_groups_puts_every_untargeted_part_first_and_keeps_each_groups_keys():
    a, b, c, d = (torch.nn.Parameter(torch.zeros(2, 2)) for _ in range(4))
    groups = [
        {"params": [a, b], "weight_decay": 0.1, "optiplug_group": "x"},
        {"params": [c, d], "weight_decay": 0.0},
    ]
    parts = optiplug.split_param_groups(groups, [b, c], {"rank": 4})
    assert [[id(p) for p in part["params"]] for part in parts] == [[id(a)], [id(d)], [id(b)], [id(c)]]
    assert [part.get("rank") for part in parts] == [None, None, 4, 4]
    assert [part["weight_decay"] for part in parts] == [0.1, 0.0, 0.1, 0.0]
    assert parts[0]["optiplug_group"] == parts[2]["optiplug_group"] == "x"
    assert groups[0]["params"] == [a, b] and "rank" not in groups[0]  # the input is not changed
    # empty parts are dropped; nothing targeted gives the groups back in order
    assert [len(p["params"]) for p in optiplug.split_param_groups(groups, [a, b])] == [2, 2]
    assert [len(p["params"]) for p in optiplug.split_param_groups(groups, [])] == [2, 2]


# ---- the shared refusal ----------------------------------------------------------------------


def _args(**fields):
    """The TrainingArguments fields the check reads (DeepSpeed and FSDP cannot be set up on this CPU machine)."""
    values = dict(deepspeed=None, fsdp=None, fsdp_config=None, world_size=1)
    return types.SimpleNamespace(**{**values, **fields})


@pytest.mark.parametrize(
    ("args", "fsdp2", "message"),
    [
        (
            {"deepspeed": {"zero_optimization": {"stage": 2}}, "world_size": 2},
            True,
            "sketch reads whole weight matrices, and DeepSpeed (ZeRO stage 2) hands the optimizer flattened 1-D "
            "partitions of the weights, cut at arbitrary elements; train with FSDP2 (fsdp_config.version: 2), DDP or "
            "a single process",
        ),
        (
            {"fsdp": "full_shard", "fsdp_config": {"version": 1}, "world_size": 2},
            True,
            "sketch reads whole weight matrices, and FSDP version 1 flattens each unit's weights into one 1-D "
            "parameter; train with FSDP2 (fsdp_config.version: 2), DDP or a single process",
        ),
        (
            {"fsdp": "full_shard", "world_size": 2},
            False,
            "sketch reads whole weight matrices, which FSDP splits into row shards across the processes; train with "
            "DDP or a single process",
        ),
    ],
)
def test_check_whole_matrices_refuses_with_one_sentence(args, fsdp2, message):
    ctx = optiplug.BuildContext(model=tiny_llama(), args=_args(**args))
    with pytest.raises(optiplug.ConfigError) as error:
        optiplug.check_whole_matrices(ctx, "sketch", "reads whole weight matrices", fsdp2=fsdp2)
    assert str(error.value) == message


def test_check_whole_matrices_allows_fsdp2_ddp_and_one_process():
    for args in ({"fsdp": "full_shard", "fsdp_config": {"version": 2}}, {"fsdp": "full_shard"}, {"world_size": 2}, {}):
        ctx = optiplug.BuildContext(model=tiny_llama(), args=_args(**args))
        optiplug.check_whole_matrices(ctx, "sketch", "reads whole weight matrices")


def test_check_whole_matrices_refuses_adapters_when_asked():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    ctx = optiplug.BuildContext(model=model)
    optiplug.check_whole_matrices(ctx, "sketch", "reads whole weight matrices")  # adapters=None: allowed
    with pytest.raises(optiplug.ConfigError) as error:
        optiplug.check_whole_matrices(ctx, "sketch", "reads whole weight matrices", adapters="sketches matrices")
    assert str(error.value) == (
        "sketch sketches matrices, and the model is a PEFT adapter model whose trainable weights are already "
        "low-rank; use adamw for adapters"
    )


# ---- shapes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "proj_type", "sides", "low", "numel"),
    [
        ((64, 32), "std", (False, True), (64, 8), 8 * 32),  # tall: right
        ((32, 64), "std", (True, False), (8, 64), 32 * 8),  # wide: left
        ((32, 32), "std", (False, True), (32, 8), 8 * 32),  # square: right, as galore-torch and apollo-torch
        ((64, 32), "reverse_std", (True, False), (8, 32), 64 * 8),
        ((64, 32), "left", (True, False), (8, 32), 64 * 8),
        ((32, 64), "right", (False, True), (32, 8), 8 * 64),
        ((64, 32), "full", (True, True), (8, 8), 64 * 8 + 8 * 32),
    ],
)
def test_projection_shapes(shape, proj_type, sides, low, numel):
    assert optiplug.projection_sides(shape, proj_type) == sides
    assert optiplug.low_rank_shape(shape, 8, proj_type) == low
    assert optiplug.projector_numel(shape, 8, proj_type) == numel


def test_rank_is_capped_at_the_smaller_side_and_a_bad_proj_type_is_named():
    assert optiplug.effective_rank((64, 6), 8) == 6 and optiplug.effective_rank((5, 64), 8) == 5
    assert optiplug.low_rank_shape((64, 6), 8, "std") == (64, 6)
    with pytest.raises(ValueError, match="proj_type must be one of std, reverse_std, right, left, full, got 'up'"):
        optiplug.projection_sides((4, 4), "up")


# ---- owners and shards -----------------------------------------------------------------------


def test_owners_are_balanced_by_size_and_the_same_everywhere():
    sizes = [100, 10, 60, 50, 40, 30, 10]
    owners = assign_owners(sizes, 2)
    assert owners == assign_owners(list(sizes), 2)  # deterministic
    loads = [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(2)]
    assert sorted(loads) == [150, 150]
    assert assign_owners([5], 4) == [0] and assign_owners([], 3) == []
    owners = assign_owners([8] * 8, 4)
    assert sorted(owners) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_chunk_sizes_follow_torch_chunk():
    for length in range(0, 12):
        for parts in range(1, 6):
            expected = [len(c) for c in torch.arange(length).chunk(parts)] if length else []
            expected += [0] * (parts - len(expected))
            assert chunk_sizes(length, parts) == expected, (length, parts)


# ---- the per-parameter base ------------------------------------------------------------------


class _SignSGD(optiplug.PerParameterOptimizer):
    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})
        self.calls = []

    def step_parameters(self, group, params):
        self.calls.append(len(params))
        for p in params:
            p.add_(p.grad.sign(), alpha=-group["lr"])


def test_per_parameter_step_is_step_parameters_over_each_group_with_gradients():
    a, b, c = (torch.nn.Parameter(torch.ones(3)) for _ in range(3))
    optimizer = _SignSGD([{"params": [a, b]}, {"params": [c], "lr": 1.0}])
    a.grad, c.grad = torch.ones(3), -torch.ones(3)
    assert optimizer.step(lambda: torch.tensor(7.0)) == 7.0
    assert optimizer.calls == [1, 1]  # b has no gradient; each group once
    assert (
        torch.equal(a, torch.full((3,), 0.9))
        and torch.equal(b, torch.ones(3))
        and torch.equal(c, torch.full((3,), 2.0))
    )
    assert [optimizer.parameter_position(p) for p in (a, b, c)] == [(0, 0, 0), (0, 1, 1), (1, 0, 2)]
    d = torch.nn.Parameter(torch.ones(1))
    optimizer.add_param_group({"params": [d]})
    assert optimizer.parameter_index(d) == 3 and optimizer.parameter_index(a) == 0


def test_step_parameters_must_be_written():
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    with pytest.raises(NotImplementedError, match="must implement step_parameters"):
        optiplug.PerParameterOptimizer([p], {"lr": 1.0}).step()


# ---- the whole-matrix base in one process ----------------------------------------------------


class _Normalized(optiplug.MatrixOptimizer):
    """Momentum (elementwise state); each matrix's update is its momentum divided by its Frobenius norm."""

    elementwise_state = ("momentum",)

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})

    def is_matrix(self, group, p):
        return p.dim() == 2

    def matrix_input(self, p, grad, state, group):
        state.setdefault("momentum", torch.zeros_like(grad)).mul_(0.5).add_(grad)
        return state["momentum"]

    def matrix_update(self, p, matrix, state, group):
        state["steps"] = state.get("steps", 0) + 1
        state["norm"] = matrix.norm()
        return matrix / state["norm"]

    def step_elementwise(self, group, params):
        for p in params:
            p.add_(p.grad, alpha=-group["lr"])


def test_matrix_optimizer_in_one_process_runs_input_update_apply_on_each_matrix():
    weight, bias = torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.ones(3))
    optimizer = _Normalized([weight, bias])
    weight.grad, bias.grad = torch.full((3, 2), 2.0), torch.ones(3)
    optimizer.step()
    optimizer.step()
    momentum = torch.full((3, 2), 3.0)  # 0.5 * 2 + 2
    assert torch.allclose(weight, 1 - 0.1 * torch.full((3, 2), 2.0 / (2.0 * 6**0.5)) - 0.1 * momentum / momentum.norm())
    assert torch.allclose(bias, torch.full((3,), 0.8))
    assert optimizer.state[weight]["steps"] == 2 and torch.equal(optimizer.state[weight]["momentum"], momentum)
    assert optimizer.last_step_matrices == optimizer.last_step_matrix_updates == 1
    assert optimizer.state[bias] == {}


def test_matrix_optimizer_layerwise_steps_equal_the_whole_step():
    models = [torch.nn.Linear(4, 3) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    whole, parts = (_Normalized(m.parameters()) for m in models)
    for model, optimizer in ((models[0], whole), (models[1], parts)):
        for _ in range(3):
            model(torch.ones(2, 4)).square().sum().backward()
            if optimizer is whole:
                optimizer.step()
            else:
                with torch.no_grad():  # as the layerwise hooks call it
                    for group in optimizer.param_groups:
                        for p in group["params"]:
                            optimizer.step_parameters(group, [p])
            optimizer.zero_grad()
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b)


def test_the_plugin_guide_shows_the_whole_matrix_plugin_verbatim():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "writing-a-plugin.md").read_text()
    package = root / "tests" / "matrix_dist" / "src" / "optiplug_testshampoo"
    for name in ("__init__.py", "optim.py"):
        assert f"```python\n# src/optiplug_testshampoo/{name}\n{(package / name).read_text()}```" in text, name


def test_split_and_count_shapes_for_describe():
    from optiplug.context import ParamShape

    shapes = [ParamShape("a", (1000, 200), 4, "Linear"), ParamShape("b", (10,), 4, "LayerNorm")]
    assert optiplug.split_shapes(shapes, {"a"}) == ([shapes[0]], [shapes[1]])
    assert optiplug.count_shapes(shapes[:1], "matrix", "matrices") == "1 matrix (0.20M parameters)"
    assert optiplug.count_shapes(shapes) == "2 tensors (0.20M parameters)"


def test_an_entry_declaring_whole_matrices_must_build_a_matrix_optimizer_under_fsdp2(temp_plugin):
    from typing import Literal

    from optiplug.factory import build_from_entry

    class FakeConfig(optiplug.OptimizerConfig):
        name: Literal["fake_matrices"] = "fake_matrices"

    entry = optiplug.OptimizerEntry(
        config=FakeConfig, build=lambda ctx, cfg: torch.optim.AdamW(ctx.param_groups()), whole_matrices=True
    )
    fsdp2 = optiplug.BuildContext(model=tiny_llama(), args=_args(fsdp="full_shard", world_size=2))
    with pytest.raises(optiplug.PluginError) as error:
        build_from_entry(entry, fsdp2, FakeConfig())
    assert str(error.value) == (
        "optimizer 'fake_matrices' declares whole_matrices=True, but its build returned AdamW, not an "
        "optiplug.MatrixOptimizer: under FSDP2 it would update row shards as if they were whole matrices; fix the "
        "plugin, or train without FSDP2"
    )
    build_from_entry(entry, optiplug.BuildContext(model=tiny_llama(), args=_args(world_size=2)), FakeConfig())  # DDP
