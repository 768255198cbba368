"""optiplug-grokadamw: the same steps as grokadamw's class, state where a checkpoint keeps it, an exact estimate.

Training and exact resume through the Trainer come from tests/test_every_optimizer.py, transformers' steps from
tests/test_transformers_names.py."""

from __future__ import annotations

import io
import warnings

import optiplug
from optiplug.testing import TokenBlocks, tiny_llama


def _steps(model, optimizer, n: int, start: int = 0) -> None:
    for seed in range(start, start + n):
        block = TokenBlocks(n=2, seed=seed)[0]
        model(input_ids=block["input_ids"][None], labels=block["labels"][None]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _groups(model):
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if "norm" not in n], "weight_decay": 0.01},
        {"params": [p for n, p in named if "norm" in n], "weight_decay": 0.0},
    ]


def test_steps_equal_grokadamws_and_a_weights_only_checkpoint_resumes_them():
    import torch
    from optiplug_grokadamw.optim import GrokAdamW, upstream_class

    ours, theirs, resumed = tiny_llama(), tiny_llama(), tiny_llama()
    optimizer = GrokAdamW(_groups(ours), lr=3e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # grokadamw's torch.cuda.amp.autocast deprecation, every step
        reference = upstream_class()(_groups(theirs), lr=3e-3)
        _steps(theirs, reference, 4)
    _steps(ours, optimizer, 2)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    resumed.load_state_dict(ours.state_dict())
    again = GrokAdamW(_groups(resumed), lr=3e-3)
    again.load_state_dict(torch.load(buffer, weights_only=True))
    _steps(ours, optimizer, 2, start=2)
    _steps(resumed, again, 2, start=2)
    for (name, a), b, c in zip(ours.named_parameters(), theirs.parameters(), resumed.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c), name


def test_estimate_equals_measured_state():
    model = tiny_llama()
    optimizer = optiplug.build_optimizer(model, "grokadamw")
    _steps(model, optimizer, 1)
    cfg = optiplug.parse_optimizer("grokadamw")
    estimate = optiplug.get_entry("grokadamw").state_bytes(optiplug.ParamShape.of_model(model), cfg)
    assert estimate == optiplug.optimizer_state_bytes(optimizer) > 0


def test_importing_grokadamw_leaves_the_root_logger_alone():
    import logging

    from optiplug_grokadamw.optim import upstream_class

    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    upstream_class()
    assert (list(root.handlers), root.level) == before
