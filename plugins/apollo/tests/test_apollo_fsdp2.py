"""apollo_adamw and apollo_mini under FSDP2 on CPU: a ``fully_shard``-ed tiny Llama, 2 processes (gloo), in the
shared "fsdp2" launch.

Each weight's projection, low-rank moments and scaling are computed once, by the matrix's owner
process, through the core's sharded matrix step, and stay sharded between steps. Compared side by side
with one process on the whole global batch.
"""

from __future__ import annotations

import pytest

from optiplug.testing_launch import (
    check_resume_in_one_process,
    check_side_by_side,
    fsdp2_side_by_side,
    launched_case,
)

APOLLO = {"name": "apollo_adamw", "rank": 8, "update_proj_gap": 2, "weight_decay": 0.01, "lr": 3e-3}
MINI = {"name": "apollo_mini", "update_proj_gap": 2, "lr": 3e-3}
RTOL = 1e-5  # float32; only the order of the gradient reduction differs

pytestmark = pytest.mark.slow


@launched_case("fsdp2")
def apollo_adamw_under_fully_shard():
    return fsdp2_side_by_side(APOLLO)


@launched_case("fsdp2")
def apollo_mini_under_fully_shard():
    return fsdp2_side_by_side(MINI)


@pytest.mark.parametrize("case", [apollo_adamw_under_fully_shard, apollo_mini_under_fully_shard])
def test_apollo_under_fsdp2_takes_the_steps_of_one_process(fsdp2, case):
    check_side_by_side(fsdp2[case], cls="ApolloAdamW", matrices=14, rtol=RTOL)


def test_a_two_process_apollo_checkpoint_resumes_in_one_process(fsdp2):
    check_resume_in_one_process(APOLLO, fsdp2[apollo_adamw_under_fully_shard][0], rtol=RTOL)
