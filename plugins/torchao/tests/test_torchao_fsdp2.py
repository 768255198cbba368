"""torchao_adamw8bit under FSDP2 on CPU: a ``fully_shard``-ed tiny Llama, 2 processes (gloo), the shared "fsdp2" launch.

torchao supports FSDP2: it quantizes each process's shard of a DTensor. Its rule "quantize only tensors of
4096 elements or more" is then applied to the shard, not the weight, so the sharded run is not one process's:
on the tiny Llama the 4096-element embedding and head are quantized in one process and not on their
2048-element shards. Asserted: it trains with the losses of one process within the 8-bit quantization's
gap, and resumes exactly from a DCP checkpoint. DeepSpeed and FSDP version 1 are refused (docs/scaling.md).
"""

from __future__ import annotations

import math

import pytest

from optiplug.testing_launch import fsdp2_side_by_side, launched_case

TORCHAO = {"name": "torchao_adamw8bit", "lr": 1e-3}
GAP = 5e-3  # measured 7.0e-4 relative over 4 steps: the embedding's and head's moments quantized in one process only

pytestmark = pytest.mark.slow


@launched_case("fsdp2")
def torchao_adamw8bit_under_fully_shard():
    return fsdp2_side_by_side(TORCHAO)


def test_torchao_adamw8bit_trains_under_fsdp2_within_its_quantization_gap_and_resumes_exactly(fsdp2):
    first = fsdp2[torchao_adamw8bit_under_fully_shard][0]
    sharded, single = first["losses"]["sharded"], first["losses"]["single"]
    assert first["class"] == "AdamW8bit" and first["groups_match"]
    assert all(math.isclose(a, b, rel_tol=GAP) for a, b in zip(sharded, single)), (sharded, single)
    assert first["losses"]["resumed"] == sharded[len(sharded) - len(first["losses"]["resumed"]) :]
