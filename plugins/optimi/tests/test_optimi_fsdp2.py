"""stable_adamw under FSDP2 on CPU: a ``fully_shard``-ed tiny Llama, 2 processes (gloo), in the shared "fsdp2" launch.

Its update clipping divides each weight's update by an RMS over the whole weight; on FSDP2's DTensor shards
that RMS is computed over the whole weight (DTensor reduces across the processes), so the steps are one
process's. DeepSpeed and FSDP version 1 hand the optimizer flat partitions instead, and are refused
(docs/scaling.md's table, tests/test_scaling.py).
"""

from __future__ import annotations

import pytest

from optiplug.testing_launch import check_side_by_side, fsdp2_side_by_side, launched_case

STABLE_ADAMW = {"name": "stable_adamw", "lr": 3e-3}

pytestmark = pytest.mark.slow


@launched_case("fsdp2")
def stable_adamw_under_fully_shard():
    return fsdp2_side_by_side(STABLE_ADAMW)


def test_stable_adamw_under_fsdp2_takes_the_steps_of_one_process(fsdp2):
    check_side_by_side(fsdp2[stable_adamw_under_fully_shard], cls="StableAdamW")
