"""grokadamw under FSDP2 on CPU: a ``fully_shard``-ed tiny Llama, 2 processes (gloo), in the shared "fsdp2" launch.

GrokAdamW clips each weight's gradient by its norm and sets each weight's momentum coefficient by its
position in the group; FSDP2 keeps one DTensor per weight, in order, and computes the norm over the whole
weight, so the steps are one process's. DeepSpeed and FSDP version 1 are refused (docs/scaling.md).
"""

from __future__ import annotations

import pytest

from optiplug.testing_launch import check_side_by_side, fsdp2_side_by_side, launched_case

GROKADAMW = {"name": "grokadamw", "lr": 3e-3}

pytestmark = pytest.mark.slow


@launched_case("fsdp2")
def grokadamw_under_fully_shard():
    return fsdp2_side_by_side(GROKADAMW)


def test_grokadamw_under_fsdp2_takes_the_steps_of_one_process(fsdp2):
    check_side_by_side(fsdp2[grokadamw_under_fully_shard], cls="GrokAdamW")
