"""optiplug.MatrixOptimizer under FSDP2 on CPU: 2 processes (gloo), a ``fully_shard``-ed model, one shared launch.

The cases run in the "fsdp2" launch of :mod:`optiplug.testing_launch` (every process runs each case);
the tests read what they returned. Each case trains a sharded model and, in the same process, an
unsharded copy on the whole global batch, so "equal to one process" is measured side by side.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

import optiplug
from optiplug.testing_launch import check_side_by_side, fsdp2_side_by_side, launch_root, launched_case

STEPS = 4
BATCH = 4  # per process; the one-process reference trains on both processes' rows
RTOL = 1e-5  # float32: the sharded gradient is summed in another order, nothing else differs
THIRD_PARTY = Path(__file__).parent / "matrix_dist"

pytestmark = pytest.mark.slow


# ---- a whole-matrix optimizer exercising the contract's corners -------------------------------


class Polar(optiplug.MatrixOptimizer):
    """Momentum (elementwise state); each matrix's update is the orthogonal polar factor of its momentum, scaled
    by a running column statistic. Matrix state of every kind: a number, a vector, a non-square matrix, a 0-d."""

    elementwise_state = ("momentum",)

    def __init__(self, params, lr=0.05):
        super().__init__(params, {"lr": lr})

    def is_matrix(self, group, p):
        return p.dim() == 2

    def matrix_input(self, p, grad, state, group):
        if "momentum" not in state:
            state["momentum"] = torch.zeros_like(grad)
        return state["momentum"].mul_(0.9).add_(grad)

    def matrix_update(self, p, matrix, state, group):
        state["steps"] = state.get("steps", 0) + 1
        if "columns" not in state:
            state["columns"] = torch.zeros(matrix.shape[1])
            state["sketch"] = torch.zeros(3, matrix.shape[0])
        state["columns"].mul_(0.5).add_(matrix.abs().mean(0))
        state["sketch"].add_(matrix[:, :3].T if matrix.shape[1] >= 3 else 1.0)
        state["norm"] = matrix.norm()
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        return (u @ vh) * (1 + state["columns"].mean())

    def apply_update(self, p, update, state, group):
        p.add_(update, alpha=-group["lr"] / math.sqrt(state["steps"]))

    def step_elementwise(self, group, params):
        for p in params:
            state = self.state[p]
            if "average" not in state:
                state["average"] = torch.zeros_like(p)
            p.add_(state["average"].mul_(0.5).add_(p.grad), alpha=-group["lr"])


class Failing(Polar):
    def matrix_update(self, p, matrix, state, group):
        if matrix.shape == (5, 7):
            raise ValueError("no polar factor today")
        return super().matrix_update(p, matrix, state, group)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(8, 7), torch.nn.Tanh(), torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)]
    return torch.nn.Sequential(*layers)  # the 1 x 5 matrix: the second process holds an empty shard of it


def _shard(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def _batch(step: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(world * BATCH, 8, generator=generator), torch.randn(world * BATCH, 1, generator=generator)


def _step(model, optimizer, step: int, rows: slice | None = None) -> float:
    import torch.distributed as dist

    x, y = _batch(step, 2)
    if rows is not None:
        x, y = x[rows], y[rows]
    loss = (model(x) - y).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    loss = loss.detach()
    if rows is not None:
        dist.all_reduce(loss)
        loss /= dist.get_world_size()
    return loss.item()


def _mine() -> slice:
    import torch.distributed as dist

    rank = dist.get_rank()
    return slice(rank * BATCH, (rank + 1) * BATCH)


def _dcp_state(model, optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def _dcp_load(model, optimizer, path: Path, no_dist: bool = False) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _dcp_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(path), no_dist=no_dist)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


# ---- the cases (every process of the launch) --------------------------------------------------


@launched_case("fsdp2")
def polar_sharded_and_one_process():
    import torch.distributed.checkpoint as dcp

    sharded, single = _shard(_model()), _model()
    opt_sharded, opt_single = Polar(sharded.parameters()), Polar(single.parameters())
    result: dict[str, Any] = {"sharded": [], "single": [], "buckets": [], "calls": []}
    for step in range(STEPS):
        if step == STEPS // 2:
            path = launch_root() / "polar-dcp"
            dcp.save(_dcp_state(sharded, opt_sharded), checkpoint_id=str(path))
        result["sharded"].append(_step(sharded, opt_sharded, step, _mine()))
        result["single"].append(_step(single, opt_single, step))
        result["calls"].append(opt_sharded.last_step_matrix_updates)
    # the same run with one matrix per bucket: the same numbers exactly
    small_net = _shard(_model())
    small = Polar(small_net.parameters())
    small.sharded_bucket_bytes = 1  # every matrix in a bucket of its own
    for step in range(STEPS):
        result["buckets"].append(_step(small_net, small, step, _mine()))
    # resumed from the checkpoint of step STEPS // 2 in a fresh sharded model
    resumed_net = _shard(_model())
    resumed = Polar(resumed_net.parameters())
    _dcp_load(resumed_net, resumed, launch_root() / "polar-dcp")
    result["resumed"] = [_step(resumed_net, resumed, step, _mine()) for step in range(STEPS // 2, STEPS)]
    result["matrices"] = opt_sharded.last_step_matrices
    result["weights_gap"] = max(
        (p.full_tensor() - q).abs().max().item() for p, q in zip(sharded.parameters(), single.parameters())
    )
    states = []
    for p, q in zip(sharded.parameters(), single.parameters()):
        mine, theirs = opt_sharded.state[p], opt_single.state[q]
        keys = sorted(mine)
        gaps = {
            k: ((mine[k].full_tensor() - theirs[k]).abs().max().item() if torch.is_tensor(theirs[k]) else None)
            for k in keys
        }
        numbers = {k: mine[k] == theirs[k] for k in keys if not torch.is_tensor(theirs[k])}
        placements = {k: str(tuple(mine[k].placements)) for k in keys if torch.is_tensor(mine[k])}
        states.append({"keys": keys, "single_keys": sorted(theirs), "gaps": gaps, "numbers": numbers,
                       "placements": placements})  # fmt: skip
    result["states"] = states
    result["state_bytes"] = {
        "sharded": optiplug.optimizer_state_bytes(opt_sharded),
        "single": optiplug.optimizer_state_bytes(opt_single),
    }
    return result


@launched_case("fsdp2")
def a_failing_matrix_update_stops_every_process():
    net = _shard(_model())
    optimizer = Failing(net.parameters())
    try:
        _step(net, optimizer, 0, _mine())
    except RuntimeError as error:
        return str(error)
    return "no error"


SHAMPOO = {"name": "one_sided_shampoo", "lr": 0.02}


@launched_case("fsdp2")
def third_party_shampoo_from_the_docs():
    """The plugin of docs/writing-a-plugin.md (tests/matrix_dist), pip-installed, trained under FSDP2."""
    import sys

    import torch.distributed as dist

    from optiplug.registry import reload_plugins
    from optiplug.testing import install_distribution

    site = launch_root() / "shampoo" / "site"
    if dist.get_rank() == 0:
        install_distribution(THIRD_PARTY, site.parent)
    dist.barrier()
    sys.path.insert(0, str(site))
    reload_plugins()
    plugin = next(r for r in optiplug.list_optimizers() if r.name == "one_sided_shampoo").plugin
    return {**fsdp2_side_by_side(SHAMPOO), "plugin": plugin}


@launched_case("fsdp2")
def layerwise_on_a_fully_shard_model():
    """``layerwise: true`` steps each parameter in its gradient hook: no hook can run the collective step."""
    from optiplug.testing import tiny_llama

    refusals = {}
    for name in ("adamw", "galore_adamw", "apollo_adamw"):
        model = tiny_llama(seed=0)
        for layer in model.model.layers:
            _fsdp(layer)
        _fsdp(model)
        try:
            optiplug.build_optimizer(model, name, layerwise=True)
            refusals[name] = None
        except optiplug.ConfigError as error:
            refusals[name] = str(error)
    return refusals


def _fsdp(module):
    from torch.distributed.fsdp import fully_shard

    return fully_shard(module)


# ---- the tests ---------------------------------------------------------------------------------


def _close(got: list[float], expected: list[float], rtol: float = RTOL) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert math.isclose(a, b, rel_tol=rtol), (got, expected)


def test_sharded_matrices_take_the_steps_of_one_process(fsdp2):
    result, _ = fsdp2[polar_sharded_and_one_process]
    _close(result["sharded"], result["single"])
    assert result["weights_gap"] < 1e-5
    assert result["matrices"] == 3
    for state in result["states"]:
        assert state["keys"] == state["single_keys"]
        assert all(gap is None or gap < 1e-5 for gap in state["gaps"].values()), state
        assert all(state["numbers"].values()), state
    # every state tensor sharded like its parameter; the 0-d norm replicated
    matrix_states = [s for s in result["states"] if "columns" in s["keys"]]
    assert len(matrix_states) == 3
    for state in matrix_states:
        assert state["placements"]["momentum"] == state["placements"]["columns"] == "(Shard(dim=0),)"
        assert state["placements"]["sketch"] == "(Shard(dim=0),)" and state["placements"]["norm"] == "(Replicate(),)"


def test_each_matrix_is_updated_once_by_one_owner(fsdp2):
    zero, one = fsdp2[polar_sharded_and_one_process]
    # 7x8 (56 elements) to one process, 5x7 (35) and 1x5 (5) to the other: balanced by size
    assert sorted([zero["calls"][-1], one["calls"][-1]]) == [1, 2]
    assert all(a + b == 3 for a, b in zip(zero["calls"], one["calls"]))


def test_state_per_process_is_about_half(fsdp2):
    zero, one = fsdp2[polar_sharded_and_one_process]
    single = zero["state_bytes"]["single"]
    assert zero["state_bytes"]["single"] == one["state_bytes"]["single"]
    assert zero["state_bytes"]["sharded"] + one["state_bytes"]["sharded"] <= single + 8 * 4  # the 0-d norms replicated
    # odd row counts (7, 5, 1) split 4+3, 3+2, 1+0: the first process holds a little more than half
    assert max(zero["state_bytes"]["sharded"], one["state_bytes"]["sharded"]) < 0.65 * single


def test_buckets_change_no_number(fsdp2):
    result, _ = fsdp2[polar_sharded_and_one_process]
    assert result["buckets"] == result["sharded"]


def test_a_checkpoint_resumes_exactly_with_the_same_processes(fsdp2):
    result, _ = fsdp2[polar_sharded_and_one_process]
    assert result["resumed"] == result["sharded"][STEPS // 2 :]


def test_a_checkpoint_of_two_processes_resumes_in_one(fsdp2):
    """DCP reshards on load: the 2-process checkpoint continues in one unsharded process."""
    result, _ = fsdp2[polar_sharded_and_one_process]
    model = _model()
    optimizer = Polar(model.parameters())
    _dcp_load(model, optimizer, fsdp2.root / "polar-dcp", no_dist=True)
    losses = []
    for step in range(STEPS // 2, STEPS):
        x, y = _batch(step, 2)
        loss = (model(x) - y).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    _close(losses, result["sharded"][STEPS // 2 :])


def test_a_failing_matrix_update_is_reported_by_every_process(fsdp2):
    for message in fsdp2[a_failing_matrix_update_stops_every_process]:
        assert message == "Failing.matrix_update failed on the owner process: ValueError: no polar factor today"


def test_a_third_party_matrix_optimizer_written_from_the_docs_trains_under_fsdp2(fsdp2):
    per_process = fsdp2[third_party_shampoo_from_the_docs]
    assert per_process[0]["plugin"] == "optiplug-testshampoo"
    # eigendecompositions of G G^T: within 1e-4 of one process (the gradient is summed in another order)
    check_side_by_side(per_process, cls="OneSidedShampoo", matrices=14, rtol=1e-4, weights_atol=1e-4)
    losses = per_process[0]["losses"]["sharded"]
    assert losses[-1] < losses[0]


def test_layerwise_is_refused_on_a_fully_shard_model(fsdp2):
    refusals, _ = fsdp2[layerwise_on_a_fully_shard_model]
    for name, message in refusals.items():
        assert message == (
            f"{name} with layerwise: true steps each parameter during backward, before FSDP has reduce-scattered its "
            "gradient across the 2 processes; set layerwise: false for distributed training"
        )
