"""The optimizer on bare tensors: bit-identical to apollo-torch, per-parameter safe, tensor-only exact resume."""

from __future__ import annotations

import io
import random

import pytest
import torch
from optiplug_apollo.optimizer import ApolloAdamW

SHAPES = [(48, 32), (32, 80), (64,), (40, 40)]  # tall, wide, a vector (plain AdamW), square


def _params(shapes=SHAPES, dtype=torch.float32):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*s).to(dtype)) for s in shapes]


def _groups(params, **apollo):
    settings = {
        "rank": 8,
        "proj": "random",
        "scale_type": "channel",
        "update_proj_gap": 3,
        "scale": 4.0,
        "proj_type": "std",
    }
    return [{"params": [params[2]]}, {"params": [params[0], params[1], params[3]], **{**settings, **apollo}}]


def _set_grads(step, *param_lists):
    generator = torch.Generator().manual_seed(step)
    grads = [torch.randn(p.shape, generator=generator) * (1 + step % 3) for p in param_lists[0]]
    for params in param_lists:
        for p, g in zip(params, grads):
            p.grad = g.clone().to(p.dtype)


def _apollo_torch(groups, **kwargs):
    from apollo_torch import APOLLOAdamW

    return APOLLOAdamW(groups, **kwargs)


CASES = [
    pytest.param({}, {}, id="random-channel"),
    pytest.param({"scale_type": "tensor", "rank": 1, "scale": 128.0}, {}, id="mini"),
    pytest.param({"proj": "svd"}, {}, id="svd-channel"),
    pytest.param({"proj": "svd", "scale_type": "tensor"}, {}, id="svd-tensor"),
    pytest.param({}, {"scale_front": True}, id="scale-front"),
    pytest.param({}, {"disable_nl": True}, id="no-limiter"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("group", "options"), CASES)
def test_bit_identical_to_apollo_torch(group, options, dtype):
    reference, ours = _params(dtype=dtype), _params(dtype=dtype)
    kwargs = {"lr": 1e-2, "weight_decay": 0.1}
    expected = _apollo_torch(_groups(reference, **group), **kwargs, **options)
    mine = {
        "scale_front": options.get("scale_front", False),
        "norm_growth_limiter": not options.get("disable_nl", False),
    }
    optimizer = ApolloAdamW(_groups(ours, **group), **kwargs, **mine)
    for step in range(7):  # projections drawn at steps 0, 3 and 6
        _set_grads(step, reference, ours)
        expected.step()
        optimizer.step()
        for a, b in zip(reference, ours):
            assert torch.equal(a, b), f"step {step} differs from apollo-torch"


def test_state_is_low_rank_and_the_projection_follows_the_shape():
    params = _params()
    optimizer = ApolloAdamW(_groups(params))
    _set_grads(0, params)
    optimizer.step()
    tall, wide, vector, square = (optimizer.state[p] for p in params)
    assert tall["exp_avg"].shape == (48, 8) and tall["proj"].shape == (8, 32)  # right: G P^T
    assert wide["exp_avg_sq"].shape == (8, 80) and wide["proj"].shape == (32, 8)  # left: P^T G
    assert square["exp_avg"].shape == (40, 8)
    assert vector["exp_avg"].shape == (64,) and "proj" not in vector
    assert tall["scaled_grad_norm"].dim() == 0 and isinstance(tall["step"], int) and isinstance(tall["seed"], int)


@pytest.mark.parametrize("proj_type", ["reverse_std", "left", "right"])
def test_channel_scaling_follows_the_projected_side(proj_type):
    """apollo-torch picks the channel axis from the shape alone, so these fail on it; here they train."""
    params = _params()
    optimizer = ApolloAdamW(_groups(params, proj_type=proj_type))
    for step in range(4):
        _set_grads(step, params)
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in params)
    tall = optimizer.state[params[0]]
    assert tall["exp_avg"].shape == ((8, 32) if proj_type in ("reverse_std", "left") else (48, 8))


def test_a_rank_above_the_matrix_size_is_capped():
    params = _params()
    optimizer = ApolloAdamW(_groups(params, rank=128))
    _set_grads(0, params)
    optimizer.step()
    assert optimizer.state[params[0]]["exp_avg"].shape == (48, 32)
    assert optimizer.state[params[1]]["proj"].shape == (32, 32)


@pytest.mark.parametrize("proj", ["random", "svd"])
def test_stepping_parameters_one_at_a_time_equals_the_full_step(proj):
    """Per-parameter safety: any subset, in any order, stepped alone, gives the full step's result."""
    whole, single = _params(), _params()
    full = ApolloAdamW(_groups(whole, proj=proj), lr=1e-2, weight_decay=0.1)
    parts = ApolloAdamW(_groups(single, proj=proj), lr=1e-2, weight_decay=0.1)
    order = list(range(len(single)))
    for step in range(7):
        _set_grads(step, whole, single)
        full.step()
        grads = [p.grad for p in single]
        random.Random(step).shuffle(order)
        for i in order:  # one parameter at a time, the others without a gradient
            for j, p in enumerate(single):
                p.grad = grads[j] if j == i else None
            parts.step()
        for a, b in zip(whole, single):
            assert torch.equal(a, b), f"step {step}"


def test_step_parameters_is_the_whole_update_of_each_parameter():
    whole, single = _params(), _params()
    full = ApolloAdamW(_groups(whole))
    parts = ApolloAdamW(_groups(single))
    for step in range(4):
        _set_grads(step, whole, single)
        full.step()
        for group in reversed(parts.param_groups):
            for p in reversed(group["params"]):
                parts.step_parameters(group, [p])
    for a, b in zip(whole, single):
        assert torch.equal(a, b)


def _roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("proj", ["random", "svd"])
def test_state_dict_is_tensors_and_numbers_and_resumes_exactly(proj, dtype):
    full, first = _params(dtype=dtype), _params(dtype=dtype)
    uninterrupted = ApolloAdamW(_groups(full, proj=proj))
    interrupted = ApolloAdamW(_groups(first, proj=proj))
    for step in range(4):  # projections drawn at steps 0 and 3
        _set_grads(step, full, first)
        uninterrupted.step()
        interrupted.step()
    saved = _roundtrip(interrupted.state_dict())  # weights_only=True: no pickled classes
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in first]
    resumed = ApolloAdamW(_groups(resumed_params, proj=proj))
    resumed.load_state_dict(saved)
    for step in range(4, 8):  # the next projection, at step 6, is drawn from the saved seed
        _set_grads(step, full, resumed_params)
        uninterrupted.step()
        resumed.step()
    for a, b in zip(full, resumed_params):
        assert torch.equal(a, b)


def test_apollo_torch_state_cannot_be_loaded_weights_only():
    """The upstream problem this plugin solves (if apollo-torch fixes it, this test says so)."""
    params = _params()
    optimizer = _apollo_torch(_groups(params))
    _set_grads(0, params)
    optimizer.step()
    with pytest.raises(Exception, match=r"GradientProjector|Unsupported global"):
        _roundtrip(optimizer.state_dict())


@pytest.mark.parametrize("proj_type", ["reverse_std", "left", "right"])
def test_apollo_torch_channel_scaling_fails_off_the_std_side(proj_type):
    """The upstream bug the channel axis rule here fixes (if apollo-torch fixes it, this test says so)."""
    params = _params()
    optimizer = _apollo_torch(_groups(params, proj_type=proj_type))
    _set_grads(0, params)
    with pytest.raises(RuntimeError, match="must match the size"):
        optimizer.step()
