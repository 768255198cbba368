"""adam_mini under FSDP2 on CPU: a ``fully_shard``-ed tiny Llama, 2 processes (gloo), in the shared "fsdp2" launch.

Each process steps its own rows: per-row blocks and per-head blocks (whole heads in each shard) locally,
norms with one all-reduce of their squared-gradient sum. Compared side by side with one process on the
whole global batch; the state is upstream's layout with global shapes, cut like each parameter, so a
2-process checkpoint also resumes in one unsharded process. A number of processes that would cut a head
is refused before the first step.
"""

from __future__ import annotations

import pytest

import optiplug
from optiplug.testing_launch import (
    check_resume_in_one_process,
    check_side_by_side,
    fsdp2_side_by_side,
    launched_case,
)

ADAM_MINI = {"name": "adam_mini", "lr": 3e-3, "weight_decay": 0.01}
RTOL = 1e-5  # float32; the gradient reduction's order and the norms' all-reduce differ

pytestmark = pytest.mark.slow


@launched_case("fsdp2")
def adam_mini_under_fully_shard():
    return fsdp2_side_by_side(ADAM_MINI)


@launched_case("fsdp2")
def adam_mini_with_heads_cut_by_the_shards():
    """3 heads of 8 rows on 2 processes: FSDP cuts the query weight's 24 rows into shards of 12."""
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=3, num_key_value_heads=3, max_position_embeddings=32)  # fmt: skip
    model = LlamaForCausalLM(config)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    try:
        optiplug.build_optimizer(model, ADAM_MINI)
    except optiplug.ConfigError as error:
        return str(error)
    return None


def test_adam_mini_under_fsdp2_takes_the_steps_of_one_process(fsdp2):
    check_side_by_side(fsdp2[adam_mini_under_fully_shard], cls="AdamMini", rtol=RTOL)


def test_each_process_holds_what_optiplug_estimate_says(fsdp2):
    """The estimate measures adam_mini on the meta model and gives one process half of it."""
    import torch

    from optiplug.app.estimate import ModelShapes, estimate_shapes
    from optiplug.testing import tiny_llama

    with torch.device("meta"):
        model = tiny_llama()
    [row] = estimate_shapes(ModelShapes.of_model(model), [optiplug.parse_optimizer(ADAM_MINI)], model, 1, 2, "fsdp")
    assert row.engine_check == "passed" and row.state_bytes is not None
    for result in fsdp2[adam_mini_under_fully_shard]:
        measured = result["state_bytes"]["sharded"]  # each norm's second moment is on both: a few bytes above half
        assert abs(measured - row.state_bytes) <= 0.01 * measured, (measured, row.state_bytes)


def test_a_two_process_adam_mini_checkpoint_resumes_in_one_process(fsdp2):
    check_resume_in_one_process(ADAM_MINI, fsdp2[adam_mini_under_fully_shard][0], rtol=RTOL)


def test_a_shard_boundary_inside_a_head_is_refused(fsdp2):
    for message in fsdp2[adam_mini_with_heads_cut_by_the_shards]:
        assert message == (
            "adam_mini under FSDP with 2 processes: model.layers.0.self_attn.q_proj.weight has 3 heads of 8 rows, "
            "and FSDP cuts its rows into shards of 12, inside a head, where adam-mini's one second moment per head "
            "would need rows of two processes; train with a number of processes whose shards hold whole heads (one "
            "that divides the number of heads), DDP or one process"
        )
