"""optimizer.param_groups with BAdam: the base AdamW of each block keeps every group's rate and options."""

from __future__ import annotations

import pytest
import torch

import optiplug
from optiplug.params import GROUP_KEY
from optiplug.testing import TokenBlocks, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore:badam. .* never updated:UserWarning")

BATCH = torch.stack([TokenBlocks(n=4, distinct=4)[i]["input_ids"] for i in range(4)])
RULES = [{"match": r"mlp", "lr_scale": 0.1, "name": "mlp"}, {"match": r"self_attn\.q_proj", "betas": [0.8, 0.9]}]


def _base_groups(optimizer):
    return [
        (g[GROUP_KEY], len(g["params"]), g["lr"], g["betas"], g["weight_decay"])
        for g in optimizer.base_optimizer.param_groups
    ]


def test_every_block_steps_each_group_at_its_own_rate_through_the_schedule():
    model = tiny_llama()
    optimizer = optiplug.build_optimizer(
        model, "badam", lr=1e-3, weight_decay=0.01, switch_every=2, switch_mode="ascending", param_groups=RULES
    )
    scheduler = optiplug.build_scheduler(optimizer, "linear", num_training_steps=10)
    seen = set()
    for _ in range(4):  # two blocks (layers 0 and 1), two steps each
        rate = optimizer.param_groups[0]["lr"]  # the rate of this step (the base groups take it in step())
        model(input_ids=BATCH, labels=BATCH).loss.backward()
        optimizer.step()
        groups = _base_groups(optimizer)
        scheduler.step()
        optimizer.zero_grad()
        seen.add(optimizer.active_block)
        # one base group per outer group: default decay / no-decay, mlp, q_proj (this block's parameters)
        assert [(label, n) for label, n, *_ in groups] == [
            ("default", 3),
            ("default", 2),
            ("mlp", 3),
            (r"self_attn\.q_proj", 1),
        ]
        by_label = {label: (lr, betas, wd) for label, n, lr, betas, wd in groups if n}
        assert by_label["default"][0] == pytest.approx(rate)
        assert by_label["mlp"][0] == pytest.approx(0.1 * rate)  # badam's own code gave every group group 0's rate
        assert by_label[r"self_attn\.q_proj"][1] == (0.8, 0.9)
        assert by_label["mlp"][2] == 0.01
    assert seen == {0, 1}
