"""optiplug-lomo: lomo and adalomo train from a config (the fused backward gets the scheduled rate without
args.optim), AdaLomo runs on the CPU, its estimate equals its state and a weights_only checkpoint resumes it.

Training and resume through the Trainer for both come from tests/test_every_optimizer.py, transformers' steps from
tests/test_transformers_names.py."""

from __future__ import annotations

import io

import pytest

import optiplug
from optiplug.testing import TokenBlocks, logged_losses, tiny_llama, training_args


def _backward_steps(model, optimizer, n: int, start: int = 0) -> None:
    for seed in range(start, start + n):
        block = TokenBlocks(n=2, seed=seed)[0]
        loss = model(input_ids=block["input_ids"][None], labels=block["labels"][None]).loss
        optimizer.fused_backward(loss, 1e-3)


def test_adalomo_state_is_estimated_and_resumes_from_a_weights_only_checkpoint():
    import torch

    model, twin = tiny_llama(), tiny_llama()
    optimizer = optiplug.build_optimizer(model, "adalomo")
    _backward_steps(model, optimizer, 2)
    cfg = optiplug.parse_optimizer("adalomo")
    estimate = optiplug.get_entry("adalomo").state_bytes(optiplug.ParamShape.of_model(model), cfg)
    assert estimate == optiplug.optimizer_state_bytes(optimizer) > 0
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    twin.load_state_dict(model.state_dict())
    resumed = optiplug.build_optimizer(twin, "adalomo")
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.step_num == 2
    _backward_steps(model, optimizer, 2, start=2)
    _backward_steps(twin, resumed, 2, start=2)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name


def test_a_clipped_norm_is_computed_before_the_fused_update(tmp_path):
    trainer = optiplug.OptiTrainer(
        model=tiny_llama(),
        args=training_args(tmp_path, max_steps=2),
        train_dataset=TokenBlocks(n=8),
        optimizer={"name": "lomo", "clip_grad_norm": 0.5},
    )
    trainer.train()
    assert len(logged_losses(trainer)) == 2
    assert trainer.optimizer.optimizer.clip_coef is not None  # upstream raises without the first pass


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (dict(gradient_accumulation_steps=2), "set it to 1 and raise the batch size"),
    ],
)
def test_what_a_fused_update_cannot_train_is_refused(tmp_path, args, message):
    trainer = optiplug.OptiTrainer(
        model=tiny_llama(), args=training_args(tmp_path, **args), train_dataset=[], optimizer="adalomo"
    )
    with pytest.raises(optiplug.ConfigError, match=message):
        trainer.check_optimizer()
