"""The optimizers on bare tensors: bit-identical to galore-torch, low-rank state, tensor-only checkpoints."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from optiplug_galore import projector
from optiplug_galore.adafactor import GaLoreAdafactor
from optiplug_galore.adamw import GaLoreAdamW

import optiplug

SHAPES = [(48, 32), (32, 80), (64,), (40, 40)]
PROJ_TYPES = ["std", "reverse_std", "left", "right", "full"]


def _params(shapes=SHAPES, dtype=torch.float32):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*s, dtype=dtype)) for s in shapes]


def _groups(params, **galore):
    settings = {"rank": 8, "update_proj_gap": 3, "scale": 0.25, "proj_type": "std", **galore}
    return [{"params": [params[2]]}, {"params": [params[0], params[1], params[3]], **settings}]


def _set_grads(step, *param_lists):
    generator = torch.Generator().manual_seed(step)
    grads = [torch.randn(p.shape, generator=generator) for p in param_lists[0]]
    for params in param_lists:
        for p, g in zip(params, grads):
            p.grad = g.clone().to(p.dtype)


def _galore_torch(kind, groups, **kwargs):
    import galore_torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "adamw":
            return galore_torch.GaLoreAdamW(groups, no_deprecation_warning=True, **kwargs)
        return galore_torch.GaLoreAdafactor(groups, scale_parameter=False, relative_step=False, **kwargs)


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
@pytest.mark.parametrize("kind", ["adamw", "adafactor"])
def test_svd_projection_is_bit_identical_to_galore_torch(kind, proj_type):
    reference, ours = _params(), _params()
    kwargs = {"lr": 1e-2, "weight_decay": 0.1}
    expected = _galore_torch(kind, _groups(reference, proj_type=proj_type), **kwargs)
    cls = GaLoreAdamW if kind == "adamw" else GaLoreAdafactor
    optimizer = cls(_groups(ours, proj_type=proj_type, projection="svd"), **kwargs)
    for step in range(7):  # refreshes at steps 0, 3 and 6
        _set_grads(step, reference, ours)
        expected.step()
        optimizer.step()
        for a, b in zip(reference, ours):
            assert torch.equal(a, b), f"{kind}/{proj_type}: step {step} differs from galore-torch"


def test_only_targeted_weights_are_projected_and_their_state_is_low_rank():
    params = _params()
    optimizer = GaLoreAdamW(_groups(params, proj_type="std", projection="svd"))
    _set_grads(0, params)
    optimizer.step()
    state = [optimizer.state[p] for p in params]
    # 48x32 is tall: right projection (8 x 32), moments 48 x 8; 32x80 is wide: left (32 x 8), moments 8 x 80
    assert state[0]["exp_avg"].shape == (48, 8) and state[0][projector.RIGHT].shape == (8, 32)
    assert projector.LEFT not in state[0]
    assert state[1]["exp_avg_sq"].shape == (8, 80) and state[1][projector.LEFT].shape == (32, 8)
    assert state[2]["exp_avg"].shape == (64,) and not {projector.LEFT, projector.RIGHT} & set(state[2])
    assert state[3]["exp_avg"].shape == (40, 8)
    # the projection matrices own their storage (not a view of the full SVD factors)
    assert state[1][projector.LEFT].untyped_storage().nbytes() == 32 * 8 * 4


def test_a_rank_above_the_matrix_size_uses_the_whole_matrix():
    params = _params()
    optimizer = GaLoreAdamW(_groups(params, rank=128, projection="randomized"))
    for step in range(2):
        _set_grads(step, params)
        optimizer.step()
    assert optimizer.state[params[0]]["exp_avg"].shape == (48, 32)
    assert optimizer.state[params[1]][projector.LEFT].shape == (32, 32)
    assert all(torch.isfinite(p).all() for p in params)


def _roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("kind", ["adamw", "adafactor", "adamw8bit"])
def test_state_dict_is_tensors_and_numbers_and_resumes_exactly(kind):
    from optiplug_galore.adamw8bit import GaLoreAdamW8bit

    cls = {"adamw": GaLoreAdamW, "adafactor": GaLoreAdafactor, "adamw8bit": GaLoreAdamW8bit}[kind]
    kwargs = {"min_8bit_size": 64} if kind == "adamw8bit" else {}
    groups = {"update_proj_gap": 3, "projection": "randomized", "rank": 4, "oversampling": 2}
    full, first = _params(), _params()
    uninterrupted = cls(_groups(full, **groups), **kwargs)
    interrupted = cls(_groups(first, **groups), **kwargs)
    for step in range(4):  # the projection was refreshed at steps 0 and 3
        _set_grads(step, full, first)
        uninterrupted.step()
        interrupted.step()
    saved = _roundtrip(interrupted.state_dict())  # weights_only=True: no pickled classes
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in first]
    resumed = cls(_groups(resumed_params, **groups), **kwargs)
    resumed.load_state_dict(saved)
    for step in range(4, 8):  # the next refresh, at step 6, draws the same random test matrix
        _set_grads(step, full, resumed_params)
        uninterrupted.step()
        resumed.step()
    for a, b in zip(full, resumed_params):
        assert torch.equal(a, b)


def test_loading_keeps_float32_statistics_of_bfloat16_weights():
    params = _params(dtype=torch.bfloat16)
    optimizer = GaLoreAdafactor(_groups(params, projection="svd"))
    _set_grads(0, params)
    optimizer.step()
    saved = _roundtrip(optimizer.state_dict())
    fresh = GaLoreAdafactor(_groups(params, projection="svd"))
    fresh.load_state_dict(saved)
    state = fresh.state[params[0]]
    assert state["exp_avg_sq_row"].dtype == torch.float32  # torch alone would have cast it to bfloat16
    assert torch.equal(state["exp_avg_sq_row"], optimizer.state[params[0]]["exp_avg_sq_row"])


# ---- 8-bit ----------------------------------------------------------------------------------


def test_adamw8bit_runs_here_and_matches_bitsandbytes():
    """bitsandbytes runs its 8-bit AdamW on this CPU, so this is the real thing: unprojected parameters
    step exactly as ``bnb.optim.AdamW8bit``; projected ones exactly as bitsandbytes' update of the
    projected gradient, projected back, then decayed (galore-torch's algorithm)."""
    import bitsandbytes as bnb
    from optiplug_galore.adamw8bit import GaLoreAdamW8bit

    reference, ours = _params([(64, 96), (128, 64), (4096,)]), _params([(64, 96), (128, 64), (4096,)])
    settings = {"rank": 16, "update_proj_gap": 3, "scale": 0.25, "proj_type": "std", "projection": "svd"}
    optimizer = GaLoreAdamW8bit(
        [{"params": [ours[2]]}, {"params": ours[:2], **settings}], lr=1e-2, weight_decay=0.1, min_8bit_size=256
    )
    plain = bnb.optim.AdamW8bit([reference[2]], lr=1e-2, weight_decay=0.1, min_8bit_size=256)
    states, low_params, low_optimizers = [{}, {}], [None, None], [None, None]
    for step in range(5):
        _set_grads(step, reference, ours)
        plain.step()
        for i in range(2):
            low = projector.project(states[i], reference[i].grad, settings, 0, step)
            if low_params[i] is None:
                low_params[i] = torch.nn.Parameter(torch.zeros_like(low))
                low_optimizers[i] = bnb.optim.AdamW8bit([low_params[i]], lr=1e-2, weight_decay=0.0, min_8bit_size=256)
            low_params[i].data.zero_()
            low_params[i].grad = low
            low_optimizers[i].step()
            with torch.no_grad():
                reference[i].add_(projector.project_back(states[i], low_params[i].detach().clone(), settings))
                reference[i].add_(reference[i], alpha=-1e-2 * 0.1)
        optimizer.step()
        for a, b in zip(reference, ours):
            assert torch.equal(a, b), f"step {step}"
    state = optimizer.state[ours[0]]
    assert state["state1"].dtype == torch.uint8 and state["state1"].shape == (16, 96)
    assert state[projector.LEFT].shape == (64, 16)


def test_adamw8bit_check_names_the_device_bitsandbytes_cannot_use():
    """No device here that bitsandbytes refuses except one that does not exist: the probe on "xpu" fails for real."""
    from optiplug_galore.entries import _bnb_8bit_problem, adamw8bit_refusal

    problem = _bnb_8bit_problem("xpu")
    assert problem and problem.startswith(("RuntimeError", "AssertionError", "NotImplementedError"))
    assert adamw8bit_refusal("xpu", "RuntimeError: no XPU") == (
        "galore_adamw8bit: bitsandbytes cannot run its 8-bit AdamW on the model's device (xpu) here "
        "(RuntimeError: no XPU); use galore_adamw instead"
    )
    assert _bnb_8bit_problem("cpu") is None


# ---- the randomized projector ---------------------------------------------------------------


@pytest.fixture(scope="module")
def real_gradients():
    """Gradients of one backward pass of a one-layer Llama (hidden 256, MLP 704: 2048x5632 scaled by 1/8)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    return {
        n.split(".")[-2]: p.grad for n, p in model.named_parameters() if n.startswith("model.layers.0") and p.dim() == 2
    }


def test_randomized_projection_error_is_within_5_percent_of_the_svd(real_gradients):
    for name, grad in real_gradients.items():
        left, right = optiplug.projection_sides(grad.shape, "std")
        exact = projector.projection_error(grad, *projector.svd_bases(grad, 16, left, right))
        generator = torch.Generator().manual_seed(0)
        bases = projector.randomized_bases(
            grad, 16, left, right, oversampling=8, power_iterations=2, generator=generator
        )
        approx = projector.projection_error(grad, *bases)
        assert exact <= approx <= 1.05 * exact, f"{name}: randomized {approx:.4f} vs svd {exact:.4f}"
        basis = bases[0] if left else bases[1].T
        assert torch.allclose(basis.T @ basis, torch.eye(16), atol=1e-5), f"{name}: basis not orthonormal"


def test_randomized_projection_is_seeded_by_parameter_and_step(real_gradients):
    grad = real_gradients["down_proj"]
    group = {"rank": 16, "proj_type": "std", "projection": "randomized", "seed": 0}
    bases = []
    for index, step in [(0, 0), (0, 0), (1, 0), (0, 5)]:
        state: dict = {}
        projector.refresh(state, grad, group, index, step)
        bases.append(state[projector.LEFT])
    assert torch.equal(bases[0], bases[1])
    assert not torch.equal(bases[0], bases[2]) and not torch.equal(bases[0], bases[3])


def test_randomized_falls_back_to_the_exact_svd_on_small_matrices(real_gradients):
    grad = real_gradients["q_proj"]  # 256 x 256: rank 250 + 8 oversampling >= 256
    generator = torch.Generator().manual_seed(0)
    left, right = projector.randomized_bases(
        grad, 250, False, True, oversampling=8, power_iterations=2, generator=generator
    )
    assert left is None and torch.equal(right, projector.svd_bases(grad, 250, False, True)[1])


def test_reverse_std_with_the_rank_at_the_matrix_size_steps():
    """galore-torch infers the side to project back from the low-rank shape, which fails here
    ("mat1 and mat2 shapes cannot be multiplied (32x80 and 32x32)"); the side is decided once from the weight."""
    param = torch.nn.Parameter(torch.randn(32, 80))
    optimizer = GaLoreAdamW(
        [{"params": [param], "rank": 32, "update_proj_gap": 2, "scale": 1.0, "proj_type": "reverse_std"}]
    )
    param.grad = torch.randn(32, 80)
    optimizer.step()
    assert optimizer.state[param][projector.RIGHT].shape == (32, 80)
    assert optimizer.state[param]["exp_avg"].shape == (32, 32)
