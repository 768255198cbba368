"""galore_adamw under FSDP2 on CPU: a ``fully_shard``-ed tiny Llama, 2 processes (gloo), in the shared "fsdp2" launch.

Each projection (an SVD or a randomized range finder of the whole gradient) is computed once, by the
matrix's owner process, through the core's sharded matrix step; the low-rank moments and projections
stay sharded between steps. Compared side by side with one process on the whole global batch.
"""

from __future__ import annotations

import pytest

from optiplug.testing_launch import (
    check_resume_in_one_process,
    check_side_by_side,
    fsdp2_side_by_side,
    launched_case,
)

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


@pytest.mark.parametrize("case", [galore_adamw_under_fully_shard, galore_adamw_svd_full_under_fully_shard])
def test_galore_adamw_under_fsdp2_takes_the_steps_of_one_process(fsdp2, case):
    # 14 projected matrices, each updated by one process; half the state per process
    check_side_by_side(fsdp2[case], cls="GaLoreAdamW", matrices=14, rtol=RTOL)


def test_a_two_process_galore_checkpoint_resumes_in_one_process(fsdp2):
    check_resume_in_one_process(GALORE, fsdp2[galore_adamw_under_fully_shard][0], rtol=RTOL)
