"""galore_adamw under FSDP2 on CPU: a ``fully_shard``-ed tiny Llama, 2 processes (gloo), in the shared "fsdp2" launch.

Each projection (an SVD or a randomized range finder of the whole gradient) is computed once, by the
matrix's owner process, through the core's sharded matrix step; the low-rank moments and projections
stay sharded between steps. Compared side by side with one process on the whole global batch.
"""

from __future__ import annotations

import math

import pytest

from optiplug.testing_launch import fsdp2_side_by_side, launch_results, launched_case, resume_in_one_process

GALORE = {"name": "galore_adamw", "rank": 8, "update_proj_gap": 2, "weight_decay": 0.01, "lr": 3e-3}
GALORE_SVD = {**GALORE, "projection": "svd", "proj_type": "full", "rank": 4}
RTOL = 1e-5  # float32; only the order of the gradient reduction differs

pytestmark = pytest.mark.slow


@launched_case("fsdp2")
def galore_adamw_under_fully_shard():
    return fsdp2_side_by_side(GALORE)


@launched_case("fsdp2")
def galore_adamw_svd_full_under_fully_shard():
    return fsdp2_side_by_side(GALORE_SVD, name="galore_adamw_svd")


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory):
    return launch_results("fsdp2", tmp_path_factory)


def _close(got, expected, rtol=RTOL):
    assert len(got) == len(expected) and all(math.isclose(a, b, rel_tol=rtol) for a, b in zip(got, expected)), (
        got,
        expected,
    )


@pytest.mark.parametrize("case", [galore_adamw_under_fully_shard, galore_adamw_svd_full_under_fully_shard])
def test_galore_adamw_under_fsdp2_takes_the_steps_of_one_process(fsdp2, case):
    zero, one = fsdp2[case]
    assert zero["class"] == "GaLoreAdamW" and zero["groups_match"]
    _close(zero["losses"]["sharded"], zero["losses"]["single"])
    assert zero["weights_gap"] < 1e-5
    assert zero["losses"]["resumed"] == zero["losses"]["sharded"][2:]  # exact resume through DCP
    # 14 projected matrices, each updated by one process; every process about half of them by size
    assert zero["matrices"] == one["matrices"] == 14
    assert zero["updates"] + one["updates"] == 14 and min(zero["updates"], one["updates"]) >= 5
    for rank in (zero, one):
        assert rank["state_bytes"]["sharded"] < 0.55 * rank["state_bytes"]["single"], rank["state_bytes"]


def test_a_two_process_galore_checkpoint_resumes_in_one_process(fsdp2):
    zero, _ = fsdp2[galore_adamw_under_fully_shard]
    _close(resume_in_one_process(GALORE, zero["checkpoint"]), zero["losses"]["sharded"][2:])
