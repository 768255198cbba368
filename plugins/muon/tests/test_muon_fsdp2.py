"""muon under FSDP2 on CPU: a ``fully_shard``-ed Llama, 2 processes (gloo), in the shared "fsdp2" launch.

accelerate enables FSDP only on GPUs, so the optimizer is built on the sharded model directly, through
``optiplug.build_optimizer`` and ``OptiTrainer.create_optimizer``, and stepped in a plain loop. Each case
trains, in the same process, an unsharded copy on the whole global batch: "equal to one process" is measured
side by side. Newton–Schulz runs in float32 here (``ns_dtype: float32``): in bfloat16 a 1e-7 difference of
two gradient sums can round a matrix's update differently, which says nothing about the sharding.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import optiplug
from optiplug.testing_launch import launch_results, launch_root, launched_case

STEPS = 6
B = 2  # per process; the one-process reference trains on both processes' rows
RTOL = 1e-5  # float32 Newton–Schulz: only the order of the gradient sums differs
WEIGHTS_ATOL = 1e-4
MUON = {"name": "muon", "ns_dtype": "float32", "weight_decay": 0.05, "adjust_lr": "spectral"}

pytestmark = pytest.mark.slow


# ---- helpers (every process) ---------------------------------------------------------------------


def _models() -> tuple[Any, Any]:
    from torch.distributed.fsdp import fully_shard

    from optiplug.testing import tiny_llama

    sharded, single = tiny_llama(seed=0), tiny_llama(seed=0)
    for layer in sharded.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    return sharded, single


def _batch(step: int) -> torch.Tensor:
    import torch.distributed as dist

    from optiplug.testing import TokenBlocks

    data = TokenBlocks(n=64, distinct=4)  # learnable: the loss falls well within STEPS steps
    world = dist.get_world_size()
    return torch.stack([data[i]["input_ids"] for i in range(step * world * B, (step + 1) * world * B)])


def _step(model: Any, optimizer: Any, step: int, sharded: bool) -> float:
    import torch.distributed as dist

    ids = _batch(step)
    if sharded:
        rank = dist.get_rank()
        ids = ids[rank * B : (rank + 1) * B]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    loss = loss.detach()
    if sharded:
        dist.all_reduce(loss)
        loss /= dist.get_world_size()
    return loss.item()


def _local_bytes(optimizer: Any) -> int:
    """The optimizer state this process holds (its shards of DTensor state)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                local = value.to_local() if hasattr(value, "to_local") else value
                total += local.numel() * local.element_size()
    return total


def _dcp_state(model: Any, optimizer: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def _dcp_load(model: Any, optimizer: Any, path: Any, no_dist: bool = False) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _dcp_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(path), no_dist=no_dist)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


# ---- the cases -----------------------------------------------------------------------------------


@launched_case("fsdp2")
def muon_sharded_and_one_process() -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from optiplug_muon.engagement import tally

    from optiplug.testing import training_args

    sharded, single = _models()
    trainer = optiplug.OptiTrainer(model=sharded, args=training_args(launch_root() / "muon-trainer"), optimizer=MUON)
    through_trainer = trainer.create_optimizer()
    optimizer, reference = optiplug.build_optimizer(sharded, MUON), optiplug.build_optimizer(single, MUON)
    result: dict[str, Any] = {"sharded": [], "single": [], "calls": [], "flops": [], "updates": []}
    for step in range(STEPS):
        if step == STEPS // 2:
            dcp.save(_dcp_state(sharded, optimizer), checkpoint_id=str(launch_root() / "muon-dcp"))
        calls, flops = tally.calls, tally.flops
        result["sharded"].append(_step(sharded, optimizer, step, sharded=True))
        result["calls"].append(tally.calls - calls)
        result["flops"].append(tally.flops - flops)
        result["updates"].append(optimizer.last_step_matrix_updates)
        calls, flops = tally.calls, tally.flops
        result["single"].append(_step(single, reference, step, sharded=False))
        result["single_calls"], result["single_flops"] = tally.calls - calls, tally.flops - flops
    resumed_net, _ = _models()
    resumed = optiplug.build_optimizer(resumed_net, MUON)
    _dcp_load(resumed_net, resumed, launch_root() / "muon-dcp")
    result["resumed"] = [_step(resumed_net, resumed, step, sharded=True) for step in range(STEPS // 2, STEPS)]
    result["weights_gap"] = max(
        (p.full_tensor() - q).abs().max().item() for p, q in zip(sharded.parameters(), single.parameters())
    )
    momentum = [
        (optimizer.state[p]["momentum_buffer"], reference.state[q]["momentum_buffer"])
        for group, ref_group in zip(optimizer.param_groups, reference.param_groups)
        if group["use_muon"]
        for p, q in zip(group["params"], ref_group["params"])
    ]
    result["momentum_gap"] = max((mine.full_tensor() - theirs).abs().max().item() for mine, theirs in momentum)
    result["momentum_placements"] = sorted({str(tuple(mine.placements)) for mine, _ in momentum})
    result["state_bytes"] = {"sharded": _local_bytes(optimizer), "single": _local_bytes(reference)}
    result["state_keys"] = sorted({k for state in optimizer.state.values() for k in state})
    result["class"] = type(optimizer).__name__
    result["trainer"] = {
        "class": type(through_trainer).__name__,
        "groups": [len(g["params"]) for g in through_trainer.param_groups],
        "roles": [g[optiplug.GROUP_ROLE] for g in through_trainer.param_groups],
    }
    result["groups"] = [len(g["params"]) for g in optimizer.param_groups]
    return result


@launched_case("fsdp2")
def muon_in_bfloat16_sharded_and_one_process() -> dict[str, Any]:
    """The default Newton–Schulz (bfloat16, torch.optim.Muon's): how far the sharded run is from one process."""
    sharded, single = _models()
    config = {**MUON, "ns_dtype": "bfloat16"}
    optimizer, reference = optiplug.build_optimizer(sharded, config), optiplug.build_optimizer(single, config)
    losses = {"sharded": [], "single": []}
    for step in range(STEPS):
        losses["sharded"].append(_step(sharded, optimizer, step, sharded=True))
        losses["single"].append(_step(single, reference, step, sharded=False))
    return losses


@launched_case("fsdp2")
def muon_that_skips_newton_schulz_is_stopped() -> str:
    """The injected failure: every owner returns the momentum as it is; the first step's check stops both."""
    from optiplug_muon.engagement import EngagementError
    from optiplug_muon.optim import MuonWithAdamW

    sharded, _ = _models()
    optimizer = optiplug.build_optimizer(sharded, MUON)

    def sgd(p: Any, matrix: Any, state: Any, group: Any) -> Any:
        state["lr_scale"] = 1.0
        return matrix

    optimizer.matrix_update = sgd  # this optimizer only
    assert isinstance(optimizer, MuonWithAdamW)
    try:
        _step(sharded, optimizer, 0, sharded=True)
    except EngagementError as error:
        return str(error)
    return "not stopped"


# ---- the tests -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory):
    return launch_results("fsdp2", tmp_path_factory)


def _gap(got: list[float], expected: list[float]) -> float:
    assert len(got) == len(expected)
    return max(abs(a - b) / abs(b) for a, b in zip(got, expected))


def test_sharded_muon_takes_the_steps_of_one_process(fsdp2):
    result, _ = fsdp2[muon_sharded_and_one_process]
    assert result["class"] == "MuonWithAdamW" and result["groups"] == [14, 2, 5]
    assert result["sharded"][-1] < result["sharded"][0] - 1.0  # it learns: 1e-5 is small against a step
    assert _gap(result["sharded"], result["single"]) <= RTOL
    assert result["weights_gap"] < WEIGHTS_ATOL and result["momentum_gap"] < WEIGHTS_ATOL
    assert result["momentum_placements"] == ["(Shard(dim=0),)"]  # the momentum stays a row shard
    assert result["state_keys"] == ["exp_avg", "exp_avg_sq", "momentum_buffer", "step"]  # lr_scale never kept


def test_the_trainers_optimizer_is_the_same_sharded_muon(fsdp2):
    result, _ = fsdp2[muon_sharded_and_one_process]
    assert result["trainer"] == {
        "class": "MuonWithAdamW",
        "groups": [14, 2, 5],
        "roles": ["muon", "adamw (not a hidden matrix)", "adamw (not a hidden matrix)"],
    }


def test_each_process_orthogonalizes_half_of_the_matrices(fsdp2):
    """Counted where Newton–Schulz runs (calls and FLOPs), never timed: 7 + 7 of 14, each once."""
    zero, one = fsdp2[muon_sharded_and_one_process]
    assert zero["single_calls"] == 14
    for step in range(STEPS):
        assert zero["calls"][step] + one["calls"][step] == 14
        assert zero["calls"][step] == zero["updates"][step] and one["calls"][step] == one["updates"][step]
        assert zero["flops"][step] + one["flops"][step] == zero["single_flops"]
        for rank in (zero, one):
            assert 0.45 <= rank["flops"][step] / zero["single_flops"] <= 0.55


def test_state_per_process_is_half_of_one_process(fsdp2):
    zero, one = fsdp2[muon_sharded_and_one_process]
    single = zero["state_bytes"]["single"]
    replicated = 7 * 4  # AdamW's float32 step counter of each of its 7 tensors: 0-d, on every process
    assert zero["state_bytes"]["sharded"] + one["state_bytes"]["sharded"] == single + replicated
    for rank in (zero, one):
        assert 0.45 <= rank["state_bytes"]["sharded"] / single <= 0.55


def test_a_checkpoint_resumes_exactly_with_the_same_processes(fsdp2):
    result, _ = fsdp2[muon_sharded_and_one_process]
    assert result["resumed"] == result["sharded"][STEPS // 2 :]


def test_a_checkpoint_of_two_processes_resumes_in_one(fsdp2):
    """DCP reshards on load: the 2-process checkpoint continues in one unsharded process, to float rounding."""
    from optiplug.testing import TokenBlocks, tiny_llama

    result, _ = fsdp2[muon_sharded_and_one_process]
    model = tiny_llama(seed=0)
    optimizer = optiplug.build_optimizer(model, MUON)
    _dcp_load(model, optimizer, fsdp2.root / "muon-dcp", no_dist=True)
    data = TokenBlocks(n=64, distinct=4)
    losses = []
    for step in range(STEPS // 2, STEPS):
        ids = torch.stack([data[i]["input_ids"] for i in range(step * 2 * B, (step + 1) * 2 * B)])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert _gap(losses, result["sharded"][STEPS // 2 :]) <= RTOL


def test_bfloat16_newton_schulz_under_fsdp2_stays_within_bfloat16_rounding(fsdp2):
    losses, _ = fsdp2[muon_in_bfloat16_sharded_and_one_process]
    assert _gap(losses["sharded"], losses["single"]) <= 2**-8  # one bfloat16 ulp of relative difference


def test_the_first_step_stops_a_sharded_muon_that_skipped_newton_schulz(fsdp2):
    for message in fsdp2[muon_that_skips_newton_schulz_is_stopped]:
        assert message == (
            "muon: the first step ran Newton–Schulz 0 times (0 + 0 on 2 processes) under FSDP2, where the routing "
            "(14 matrices to Muon) needs 14: Muon is not running as configured, and the run stops rather than train "
            "something else under its name; please report it with your torch and engine versions"
        )
