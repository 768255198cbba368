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
from optiplug.testing_launch import (
    check_side_by_side,
    fsdp2_side_by_side,
    launched_case,
    resume_in_one_process,
)

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


def _step(model: Any, optimizer: Any, step: int, sharded: bool) -> float:
    import torch.distributed as dist

    from optiplug.testing import TokenBlocks

    data, world = TokenBlocks(n=64, distinct=4), dist.get_world_size()
    ids = torch.stack([data[i]["input_ids"] for i in range(step * world * B, (step + 1) * world * B)])
    if sharded:
        ids = ids[dist.get_rank() * B : (dist.get_rank() + 1) * B]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    loss = loss.detach()
    if sharded:
        dist.all_reduce(loss)
        loss /= world
    return loss.item()


# ---- the cases -----------------------------------------------------------------------------------


@launched_case("fsdp2")
def muon_side_by_side() -> dict[str, Any]:
    """Through OptiTrainer.create_optimizer and build_optimizer; DCP checkpoint and resume (the shared helper)."""
    return fsdp2_side_by_side(MUON, steps=STEPS, batch=B, name="muon")


@launched_case("fsdp2")
def muon_newton_schulz_work() -> dict[str, Any]:
    """Newton–Schulz counted where it runs, per step and process (calls and FLOPs, never time); the state kept."""
    from optiplug_muon.engagement import tally

    sharded, single = _models()
    optimizer, reference = optiplug.build_optimizer(sharded, MUON), optiplug.build_optimizer(single, MUON)
    result: dict[str, Any] = {"calls": [], "flops": [], "updates": []}
    for step in range(2):
        calls, flops = tally.calls, tally.flops
        _step(sharded, optimizer, step, sharded=True)
        result["calls"].append(tally.calls - calls)
        result["flops"].append(tally.flops - flops)
        result["updates"].append(optimizer.last_step_matrix_updates)
        calls, flops = tally.calls, tally.flops
        _step(single, reference, step, sharded=False)
        result["single_calls"], result["single_flops"] = tally.calls - calls, tally.flops - flops
    momentum = [
        (optimizer.state[p]["momentum_buffer"], reference.state[q]["momentum_buffer"])
        for group, ref_group in zip(optimizer.param_groups, reference.param_groups)
        if group["use_muon"]
        for p, q in zip(group["params"], ref_group["params"])
    ]
    result["momentum_gap"] = max((mine.full_tensor() - theirs).abs().max().item() for mine, theirs in momentum)
    result["momentum_placements"] = sorted({str(tuple(mine.placements)) for mine, _ in momentum})
    result["state_keys"] = sorted({k for state in optimizer.state.values() for k in state})
    result["roles"] = [g[optiplug.GROUP_ROLE] for g in optimizer.param_groups]
    return result


@launched_case("fsdp2")
def muon_in_bfloat16_sharded_and_one_process() -> dict[str, Any]:
    """The default Newton–Schulz (bfloat16, torch.optim.Muon's): how far the sharded run is from one process."""
    sharded, single = _models()
    config = {**MUON, "ns_dtype": "bfloat16"}
    optimizer, reference = optiplug.build_optimizer(sharded, config), optiplug.build_optimizer(single, config)
    losses: dict[str, list[float]] = {"sharded": [], "single": []}
    for step in range(STEPS):
        losses["sharded"].append(_step(sharded, optimizer, step, sharded=True))
        losses["single"].append(_step(single, reference, step, sharded=False))
    return losses


@launched_case("fsdp2")
def muon_that_skips_newton_schulz_is_stopped() -> str:
    """The injected failure: every owner returns the momentum as it is; the first step's check stops both."""
    from optiplug_muon.engagement import EngagementError

    sharded, _ = _models()
    optimizer = optiplug.build_optimizer(sharded, MUON)

    def sgd(p: Any, matrix: Any, state: Any, group: Any) -> Any:
        state["lr_scale"] = 1.0
        return matrix

    optimizer.matrix_update = sgd  # this optimizer only
    try:
        _step(sharded, optimizer, 0, sharded=True)
    except EngagementError as error:
        return str(error)
    return "not stopped"


# ---- the tests -----------------------------------------------------------------------------------


def _gap(got: list[float], expected: list[float]) -> float:
    assert len(got) == len(expected)
    return max(abs(a - b) / abs(b) for a, b in zip(got, expected))


def test_sharded_muon_takes_the_steps_of_one_process_and_resumes_exactly(fsdp2):
    """Losses within 1e-5, weights within 1e-4, DCP resume exact, at most 0.55 of the state on each process."""
    per_process = fsdp2[muon_side_by_side]
    check_side_by_side(per_process, cls="MuonWithAdamW", matrices=14, rtol=RTOL, weights_atol=WEIGHTS_ATOL)
    losses = per_process[0]["losses"]["sharded"]
    assert losses[-1] < losses[0] - 1.0  # it learns: 1e-5 is small against a step


def test_a_checkpoint_of_two_processes_resumes_in_one(fsdp2):
    """DCP reshards on load: the 2-process checkpoint continues in one unsharded process, to float rounding."""
    result = fsdp2[muon_side_by_side][0]
    losses = resume_in_one_process(MUON, result["checkpoint"], steps=STEPS, batch=B)
    assert _gap(losses, result["losses"]["sharded"][STEPS // 2 :]) <= RTOL


def test_state_per_process_is_half_of_one_process(fsdp2):
    zero, one = (result["state_bytes"] for result in fsdp2[muon_side_by_side])
    replicated = 7 * 4  # AdamW's float32 step counter of each of its 7 tensors: 0-d, on every process
    assert zero["sharded"] + one["sharded"] == zero["single"] + replicated
    for rank in (zero, one):
        assert 0.45 <= rank["sharded"] / rank["single"] <= 0.55


def test_each_process_orthogonalizes_half_of_the_matrices(fsdp2):
    """Counted where Newton–Schulz runs (calls and FLOPs), never timed: 7 + 7 of 14, each once."""
    zero, one = fsdp2[muon_newton_schulz_work]
    assert zero["single_calls"] == 14
    for step in range(2):
        assert zero["calls"][step] + one["calls"][step] == 14
        assert zero["calls"][step] == zero["updates"][step] and one["calls"][step] == one["updates"][step]
        assert zero["flops"][step] + one["flops"][step] == zero["single_flops"]
        for rank in (zero, one):
            assert 0.45 <= rank["flops"][step] / zero["single_flops"] <= 0.55


def test_the_momentum_stays_a_row_shard_and_the_lr_factor_is_never_kept(fsdp2):
    result, _ = fsdp2[muon_newton_schulz_work]
    assert result["momentum_gap"] < WEIGHTS_ATOL
    assert result["momentum_placements"] == ["(Shard(dim=0),)"]
    assert result["state_keys"] == ["exp_avg", "exp_avg_sq", "momentum_buffer", "step"]  # lr_scale: one step only
    assert result["roles"] == ["muon", "adamw (not a hidden matrix)", "adamw (not a hidden matrix)"]


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
