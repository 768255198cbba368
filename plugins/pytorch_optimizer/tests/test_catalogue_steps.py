"""The catalogue-wide promise, tensor-level: every bridged optimizer steps, resumes exactly from a
``torch.load(weights_only=True)`` checkpoint, and its measured (meta-device) state size is exact.

One small model (embedding, two linear layers, a norm, a head: every kind of parameter a language
model has) and a Trainer-like step (clipping, a cosine schedule, RNG seeded per step as a resumed
Trainer restores it) keep the whole catalogue well under a minute. A sample of the catalogue also goes
through the full Trainer path in the registry-wide tests (tests/test_every_optimizer.py).
"""

from __future__ import annotations

import io
import math
import random
import warnings

import pytest
from optiplug_pytorch_optimizer import NO_ESTIMATE
from optiplug_pytorch_optimizer.catalogue import PREFIX, specs
from optiplug_pytorch_optimizer.factory import (
    BFLOAT16_NAN,
    STAND_IN_REVIEWED,
    Unknown,
    measured_state_bytes,
    stand_in_state_bytes,
)

import optiplug

STEPS, RESUME_AT = 6, 3
# the run fills in fields the optimizer requires (ranger21's num_iterations is the run's max_steps);
# AdaShift moves nothing until its queue of keep_num gradients is full (10 by default)
RUN_FIELDS = {"po_ranger21": {"num_iterations": STEPS}, "po_adashift": {"keep_num": 2}}
# SpectralSphere trains 2-D matrices only: it gets the model with everything else frozen
MATRICES_ONLY = {"po_spectralsphere"}


def tiny_model(name: str, seed: int = 0, vocab: int = 16, width: int = 12):
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, 8)
            self.proj = nn.Linear(8, width)
            self.down = nn.Linear(width, 8, bias=False)
            self.norm = nn.LayerNorm(8)
            self.lm_head = nn.Linear(8, vocab, bias=False)

        def forward(self, ids):
            hidden = self.down(torch.relu(self.proj(self.embed(ids))))
            return self.lm_head(self.norm(hidden))

    torch.manual_seed(seed)
    model = Tiny()
    if name in MATRICES_ONLY:
        for param in model.parameters():
            param.requires_grad_(param.ndim == 2)
    return model


def _build(name: str, model):
    import torch
    from transformers import get_cosine_schedule_with_warmup

    entry = optiplug.get_entry(name)
    cfg = optiplug.parse_optimizer(name, **RUN_FIELDS.get(name, {}))
    ctx = optiplug.BuildContext(model=model)
    if entry.check is not None:
        entry.check(ctx, cfg)
    optimizer = entry.build(ctx, cfg)
    assert isinstance(optimizer, torch.optim.Optimizer)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, 1, 2 * STEPS)


def _step(model, optimizer, scheduler, k: int) -> float:
    import numpy as np
    import torch

    random.seed(k)
    np.random.seed(k)
    torch.manual_seed(k)
    vocab = model.embed.num_embeddings
    ids = torch.randint(0, vocab, (4, 6), generator=torch.Generator().manual_seed(100 + k))
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    return float(loss)


def _roundtrip(obj):
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


NAMES = sorted(specs())


@pytest.mark.parametrize("name", NAMES)
def test_steps_and_resumes_exactly(name):
    import torch

    warnings.simplefilter("ignore")
    model = tiny_model(name)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer, scheduler = _build(name, model)
    losses = [_step(model, optimizer, scheduler, k) for k in range(RESUME_AT)]
    assert all(math.isfinite(loss) for loss in losses), f"{name}: {losses}"

    saved_optimizer = _roundtrip(optimizer.state_dict())
    saved_scheduler = _roundtrip(scheduler.state_dict())
    resumed = tiny_model(name, seed=1)
    resumed.load_state_dict(model.state_dict())
    resumed_optimizer, resumed_scheduler = _build(name, resumed)
    resumed_optimizer.load_state_dict(saved_optimizer)
    resumed_scheduler.load_state_dict(saved_scheduler)
    for k in range(RESUME_AT, STEPS):
        _step(model, optimizer, scheduler, k)
        _step(resumed, resumed_optimizer, resumed_scheduler, k)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters())), f"{name}: nothing moved"
    for (param_name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), f"{name}: {param_name} differs after resuming at step {RESUME_AT}"


@pytest.mark.parametrize("name", NAMES)
def test_measured_state_bytes_equal_the_real_state(name):
    """``state_bytes`` (meta device, or reviewed stand-ins) equals the real state; "unknown" only where neither can."""
    warnings.simplefilter("ignore")
    entry = optiplug.get_entry(name)
    model = tiny_model(name)
    shapes = optiplug.ParamShape.of_model(model)
    cfg = optiplug.parse_optimizer(name, **RUN_FIELDS.get(name, {}))
    if name.removeprefix(PREFIX) in NO_ESTIMATE:
        assert entry.state_bytes is None
        with pytest.raises(Unknown):
            measured_state_bytes(shapes, cfg)  # the list of unknowns is no longer than it must be
        return
    optimizer, scheduler = _build(name, model)
    real = 0
    for k in range(STEPS):
        _step(model, optimizer, scheduler, k)
        real = max(real, optiplug.optimizer_state_bytes(optimizer))
    assert entry.state_bytes is not None
    assert entry.state_bytes(shapes, cfg) == real


@pytest.mark.parametrize("name", NAMES)
def test_steps_with_bfloat16_weights(name):
    """Nothing listed fails in its first steps with bfloat16 weights either: it steps, or its check refuses."""
    import torch

    warnings.simplefilter("ignore")
    model = tiny_model(name).to(torch.bfloat16)
    try:
        optimizer, scheduler = _build(name, model)
    except optiplug.ConfigError as error:
        assert name.removeprefix(PREFIX) in BFLOAT16_NAN, f"{name}: {error}"
        assert "bfloat16" in str(error)
        return
    losses = [_step(model, optimizer, scheduler, k) for k in range(RESUME_AT)]
    assert all(math.isfinite(loss) for loss in losses), f"{name}: {losses}"
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters()), name


@pytest.mark.parametrize("name", sorted(PREFIX + source for source in STAND_IN_REVIEWED))
def test_stand_in_state_bytes_scale_to_parameters_wider_than_the_stand_ins(name):
    """Measured on stand-ins cut to 67 and 71 and scaled per element: exact for weights of 96 x 8 and 80 x 8."""
    warnings.simplefilter("ignore")
    model = tiny_model(name, vocab=96, width=80)
    optimizer, scheduler = _build(name, model)
    real = 0
    for k in range(STEPS):
        _step(model, optimizer, scheduler, k)
        real = max(real, optiplug.optimizer_state_bytes(optimizer))
    cfg = optiplug.parse_optimizer(name, **RUN_FIELDS.get(name, {}))
    assert stand_in_state_bytes(optiplug.ParamShape.of_model(model), cfg) == real


@pytest.mark.parametrize("name", ["po_lion", "po_adamw", "po_adafactor", "po_came", "po_soap", "po_prodigy", "po_muon"])
def test_measured_state_bytes_of_bfloat16_weights(name):
    """2-byte parameters are measured as bfloat16: states kept in float32 or in the weights' dtype both come out."""
    import torch

    warnings.simplefilter("ignore")
    model = tiny_model(name).to(torch.bfloat16)
    optimizer, scheduler = _build(name, model)
    real = 0
    for k in range(STEPS):
        _step(model, optimizer, scheduler, k)
        real = max(real, optiplug.optimizer_state_bytes(optimizer))
    cfg = optiplug.parse_optimizer(name)
    assert optiplug.get_entry(name).state_bytes(optiplug.ParamShape.of_model(model), cfg) == real


@pytest.mark.parametrize("projection_type", ["std", "reverse_std", "right", "left", "full", "random"])
def test_conda_projectors_resume_exactly(projection_type, monkeypatch):
    """Conda's GaLoreProjector objects go through the checkpoint as dicts, for every projection (re-drawn every 2 steps)."""
    monkeypatch.setitem(RUN_FIELDS, "po_conda", {"projection_type": projection_type, "update_proj_gap": 2})
    test_steps_and_resumes_exactly("po_conda")


def test_only_listed_classes_are_rebuilt_from_a_checkpoint():
    warnings.simplefilter("ignore")
    model = tiny_model("po_conda")
    optimizer, scheduler = _build("po_conda", model)
    _step(model, optimizer, scheduler, 0)
    saved = _roundtrip(optimizer.state_dict())
    first = next(iter(saved["state"].values()))
    assert first["projector"]["optiplug_object"] == "galore_projector"
    first["projector"]["optiplug_object"] = "os:system"  # a forged checkpoint names something else
    fresh, _ = _build("po_conda", tiny_model("po_conda"))
    fresh.load_state_dict(saved)
    assert isinstance(next(iter(fresh.state.values()))["projector"], dict)  # left as data, nothing imported


@pytest.mark.parametrize("graft_type", ["none", "sgd", "adagrad", "rmsprop", "sqrtn"])
@pytest.mark.parametrize("pre_conditioner_type", ["all", "input"])
def test_scalable_shampoo_preconditioners_resume_exactly(graft_type, pre_conditioner_type, monkeypatch):
    """ScalableShampoo's PreConditioner, BlockPartitioner and graft objects go through the checkpoint as dicts:
    preconditioning from step 2, blocks of 4 (every weight partitioned), roots recomputed every 2 steps."""
    fields = {
        "graft_type": graft_type,
        "pre_conditioner_type": pre_conditioner_type,
        "block_size": 4,
        "start_preconditioning_step": 2,
        "preconditioning_compute_steps": 2,
    }
    monkeypatch.setitem(RUN_FIELDS, "po_scalableshampoo", fields)
    test_steps_and_resumes_exactly("po_scalableshampoo")


def test_scalable_shampoo_state_is_measured_before_preconditioning_starts_and_stays():
    """Its statistics are allocated at the first step: the size measured then holds after preconditioning starts."""
    warnings.simplefilter("ignore")
    name = "po_scalableshampoo"
    model = tiny_model(name)
    optimizer, scheduler = _build(name, model)
    sizes = set()
    for k in range(30):  # preconditioning starts at step 25 by default
        _step(model, optimizer, scheduler, k)
        sizes.add(optiplug.optimizer_state_bytes(optimizer))
    cfg = optiplug.parse_optimizer(name)
    assert sizes == {optiplug.get_entry(name).state_bytes(optiplug.ParamShape.of_model(model), cfg)}
