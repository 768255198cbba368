"""optiplug-optimi: stable_adamw's estimate equals its measured state (float32 and bfloat16 weights, Kahan on and
off); training and exact resume come from the registry-wide tests (tests/test_every_optimizer.py), transformers'
steps from tests/test_transformers_names.py."""

from __future__ import annotations

import pytest

import optiplug
from optiplug.testing import TokenBlocks, tiny_llama


@pytest.mark.parametrize(("dtype", "kahan_sum"), [("float32", None), ("bfloat16", None), ("bfloat16", False)])
def test_estimate_equals_measured_state(dtype, kahan_sum):
    import torch

    model = tiny_llama().to(getattr(torch, dtype))
    cfg = optiplug.parse_optimizer({"name": "stable_adamw", "kahan_sum": kahan_sum})
    optimizer = optiplug.build_optimizer(model, cfg)
    block = TokenBlocks(n=2)[0]
    model(input_ids=block["input_ids"][None], labels=block["labels"][None]).loss.backward()
    optimizer.step()
    measured = optiplug.optimizer_state_bytes(optimizer)
    assert optiplug.get_entry("stable_adamw").state_bytes(optiplug.ParamShape.of_model(model), cfg) == measured
    kahan = [state["kahan_comp"] for state in optimizer.state.values()]
    assert all(k is not None for k in kahan) == (dtype == "bfloat16" and kahan_sum is None)


def test_booleans_in_optim_args_mean_what_they_say():
    from types import SimpleNamespace

    from optiplug_optimi import transformers_arguments

    args = SimpleNamespace(learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.99, adam_epsilon=1e-8, weight_decay=0.0)
    fields = transformers_arguments(args, {"kahan_sum": "False", "decouple_lr": "true"})
    cfg = optiplug.parse_optimizer({"name": "stable_adamw", **fields})
    assert (cfg.kahan_sum, cfg.decouple_lr, cfg.eps) == (False, True, 1e-8)  # transformers: bool("False") is True
