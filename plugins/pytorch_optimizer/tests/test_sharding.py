"""The bridge under sharded engines, tensor-level for the whole catalogue (multi-process runs for a sample:
test_sharding_launched.py).

Sharding hands each process a piece of every tensor and one optimizer of its own: DeepSpeed ZeRO flat
1-D partitions cut at arbitrary elements, FSDP row shards. The test of an optimizer that
:mod:`optiplug_pytorch_optimizer.sharding` calls elementwise does just that: a weight matrix stepped
by one optimizer, and the same matrix flattened and cut inside a row into two halves, each stepped by
its own optimizer, as two ZeRO processes would. The halves must take the whole matrix's steps. The
inputs are built to show any reading across elements: the rows of the weight and of its gradients
span three orders of magnitude, so a norm, a mean or a clip over the tensor differs between the
halves and the whole.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace
from typing import Any

import pytest
from optiplug_pytorch_optimizer import sharding
from optiplug_pytorch_optimizer.catalogue import PREFIX, specs
from optiplug_pytorch_optimizer.factory import _finish, _run_free, constructor, kwargs_of, muon_groups

import optiplug

SOURCES = sorted(spec.source for spec in specs().values())
SHAPE, CUT, STEPS = (8, 12), 45, 8  # the cut falls inside row 3
# Settings under which a refused optimizer's reading across elements shows within STEPS steps on a small matrix:
# preconditioning from the first step in small blocks, AdaShift's queue short, Ranger21's schedule the run's length,
# SGDP's projection always on, ApolloDQN's rebound from the gradient's change, AdaNorm's average short.
SHOWS_WITH = {
    "scalableshampoo": {"start_preconditioning_step": 1, "preconditioning_compute_steps": 1, "block_size": 4},
    "sgdp": {"delta": 10.0},
    "apollodqn": {"rebound": "belief"},
    "adanorm": {"r": 0.5},
    "shampoo": {"preconditioning_compute_steps": 1},
    "adashift": {"keep_num": 2},
    "ranger21": {"num_iterations": STEPS},
    "spam": {"density": 0.5},
    "soap": {"precondition_frequency": 1},
}
# Refused optimizers whose reading across elements does not show on a small matrix in a few steps, and why.
NOT_SHOWN = {
    "sara": "updates only weights below threshold in absolute value, so nothing moves here; refused for its flat "
    "state of the selected entries (boolean masks over the whole tensor) and its rank penalty on matrices above 64x64",
    "spectralsphere": "steps 2-D weights only: the halves (1-D) are refused by its constructor",
    "swats": "its dot products over each tensor decide when it switches from Adam to SGD and at which learning rate; "
    "the switch does not come within a few steps here",
}


def _optimizer(source: str, tensors: list[Any], settings: dict[str, Any], group: dict[str, Any], more: Any = None):
    """The bridged optimizer, built as the bridge builds it, on fresh parameters holding ``tensors`` (in one group
    with the options ``group``), plus ``more`` parameters in a second group without weight decay."""
    import torch

    spec = specs()[PREFIX + source]
    cfg = optiplug.parse_optimizer(spec.name, **settings)
    kwargs = kwargs_of(spec, cfg.model_copy(update=_run_free(spec, cfg)))
    params = [torch.nn.Parameter(t.clone()) for t in tensors]
    extra = [torch.nn.Parameter(t.clone()) for t in more or []]
    if spec.takes == "muon":
        hidden, rest = muon_groups([(f"w{i}", p, "Linear") for i, p in enumerate(params + extra)])
        groups = [
            {"params": hidden, "lr": kwargs["lr"], "weight_decay": kwargs["weight_decay"], "use_muon": True},
            {"params": rest, "lr": kwargs["adamw_lr"], "weight_decay": kwargs["adamw_wd"], "use_muon": False},
        ]
        groups = [g for g in groups if g["params"]]
    else:
        groups = [{"params": params, **group}] + ([{"params": extra, "weight_decay": 0.0}] if extra else [])
    return params + extra, _finish(constructor(spec)(groups, **kwargs))


def halves_gap(source: str, settings: dict[str, Any] | None = None, group: dict[str, Any] | None = None):
    """(largest difference between the whole matrix's steps and its two halves', largest movement of a weight)."""
    import torch

    settings = {"weight_decay": 0.01, **(settings or {})} if "weight_decay" in _fields(source) else settings or {}
    generator = torch.Generator().manual_seed(0)
    rows = torch.logspace(-1.5, 1.5, SHAPE[0]).unsqueeze(1)  # rows three orders of magnitude apart
    weight = torch.randn(SHAPE, generator=generator) * rows
    direction = torch.randn(SHAPE, generator=generator)
    grads = [(direction + 0.5 * torch.randn(SHAPE, generator=generator)) * rows for _ in range(STEPS)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (whole,), optimizer = _optimizer(source, [weight], settings, group or {})
        flat = weight.flatten()
        pieces = [_optimizer(source, [piece], settings, group or {}) for piece in (flat[:CUT], flat[CUT:])]
        torch.manual_seed(0)
        for grad in grads:
            whole.grad = grad.clone()
            optimizer.step()
        torch.manual_seed(0)
        for grad in grads:
            for ((param,), piece_optimizer), piece_grad in zip(pieces, (grad.flatten()[:CUT], grad.flatten()[CUT:])):
                param.grad = piece_grad.clone()
                piece_optimizer.step()
    halves = torch.cat([param.detach() for (param,), _ in pieces])
    moved = (whole.detach().flatten() - flat).abs().max().item()
    return (whole.detach().flatten() - halves).abs().max().item(), moved


def _fields(source: str) -> set[str]:
    return set(optiplug.get_entry(PREFIX + source).config.model_fields)


ELEMENTWISE_RTOL = 1e-6  # of the largest movement: float32 rounding (measured: 0 for all but two, at most 9e-8)
ACROSS_RTOL = 1e-3  # the refused ones differ by 8e-3 of it and (mostly) far more


def test_every_bridged_optimizer_is_classified_once():
    assert sharding.ELEMENTWISE.isdisjoint(sharding.WHOLE_TENSOR)
    assert sharding.ELEMENTWISE | set(sharding.WHOLE_TENSOR) == set(SOURCES)
    assert set(sharding.FIELD_OPTIONS) <= sharding.ELEMENTWISE
    assert set(sharding.DEEPSPEED_ONLY) <= sharding.ELEMENTWISE
    assert set(sharding.INSTEAD) <= set(SOURCES)
    assert set(NOT_SHOWN) <= set(sharding.WHOLE_TENSOR)
    for source, fields in sharding.FIELD_OPTIONS.items():
        assert set(fields) <= _fields(source), source


@pytest.mark.parametrize("source", sorted(sharding.ELEMENTWISE))
def test_an_elementwise_optimizer_takes_the_same_steps_on_two_halves_stepped_apart(source):
    gap, moved = halves_gap(source)
    assert moved > 1e-4, f"{source} moved nothing in {STEPS} steps: the comparison would prove nothing"
    assert gap <= ELEMENTWISE_RTOL * moved, (
        f"{source}: the halves differ from the whole by {gap:.3g} (moved {moved:.3g})"
    )


@pytest.mark.parametrize("source", sorted(set(sharding.WHOLE_TENSOR) - set(NOT_SHOWN)))
def test_a_refused_optimizer_reads_across_elements(source):
    """The other direction: the refusals are not guesses (where a small matrix shows it)."""
    gap, moved = halves_gap(source, SHOWS_WITH.get(source))
    assert gap > ACROSS_RTOL * moved, f"{source}: the halves take the whole's steps ({gap:.3g}, moved {moved:.3g})"


@pytest.mark.parametrize("source", sorted(NOT_SHOWN))
def test_what_a_small_matrix_cannot_show_is_said(source):
    """Kept honest: if one of these starts to show its reading here, it moves to the test above."""
    try:
        gap, moved = halves_gap(source)
    except ValueError:  # the halves are refused (SpectralSphere: 2-D weights only)
        return
    assert moved == 0 or gap <= ELEMENTWISE_RTOL * moved, (source, gap, moved)


LOW_RANK = {"rank": 2, "update_proj_gap": 2, "scale": 1.0, "projection_type": "std"}
# ---- DeepSpeed's calling pattern: one step() per parameter group ---------------------------------------------


def deepspeed_pattern_gap(source: str, stage: int) -> tuple[float, float]:
    """(largest difference, largest movement) between stepping two groups together and stepping them as DeepSpeed
    does: ZeRO-1/2 shows the optimizer one group at a time; ZeRO-3 keeps every group with only one holding its
    parameters. The optimizer is wrapped as the bridge wraps it under DeepSpeed."""
    import torch

    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(40, generator=generator), torch.randn(24, generator=generator)]
    grads = [[torch.randn(t.shape, generator=generator) for t in tensors] for _ in range(STEPS)]
    results = []
    for pattern in ("together", f"zero{stage}"):
        settings = {"weight_decay": 0.01} if "weight_decay" in _fields(source) else {}
        params, optimizer = _optimizer(source, [tensors[0]], settings, {}, more=[tensors[1]])
        sharding.step_only_groups_with_parameters(optimizer)
        groups = list(optimizer.param_groups)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for grad in grads:
                for param, value in zip(params, grad):
                    param.grad = value.clone()
                if pattern == "together":
                    optimizer.step()
                    continue
                for index in range(len(groups)):
                    if stage == 3:
                        for other, group in enumerate(groups):
                            group["params"] = [params[other]] if other == index else []
                    else:
                        optimizer.param_groups = [groups[index]]
                    optimizer.step()
                optimizer.param_groups = groups
                for group, param in zip(groups, params):
                    group["params"] = [param]
        results.append(torch.cat([param.detach() for param in params]))
    moved = (results[0] - torch.cat(tensors)).abs().max().item()
    return (results[0] - results[1]).abs().max().item(), moved


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("source", sorted(sharding.ELEMENTWISE - {"madgrad"}))
def test_an_elementwise_optimizer_takes_its_steps_when_deepspeed_steps_it_group_by_group(source, stage):
    gap, moved = deepspeed_pattern_gap(source, stage)
    assert moved > 0 and gap <= ELEMENTWISE_RTOL * moved, (source, gap, moved)


def test_madgrads_one_step_count_for_all_groups_is_why_it_is_refused_under_deepspeed():
    for stage in (2, 3):
        gap, moved = deepspeed_pattern_gap("madgrad", stage)
        assert gap > ACROSS_RTOL * moved, (stage, gap, moved)
    assert "one step count for all its parameter groups" in sharding.DEEPSPEED_ONLY["madgrad"]


def test_under_deepspeed_the_bridge_steps_only_the_groups_that_hold_parameters():
    from optiplug.testing import tiny_llama

    entry = optiplug.get_entry("po_adan")
    wrapped = entry.build(_context("deepspeed", 3), entry.config())
    assert "step" in vars(wrapped)  # the instance's own step, around upstream's
    plain = entry.build(optiplug.BuildContext(model=tiny_llama()), entry.config())
    assert "step" not in vars(plain)  # one process: upstream's step as it is


# Elementwise optimizers and the settings that make them read across elements: a field, or a per-group option.
OPTION_CASES = [
    ("adan", {"max_grad_norm": 0.5}, {}),
    ("lion", {}, {"adanorm": True, "adanorm_r": 0.5}),
    ("lion", {}, {"cautious": True}),
    ("lion", {}, {"use_gc": True}),
    ("adopt", {}, {"stable_adamw": True}),
    ("adamwsn", {}, {"sn": True}),
    ("galore", {}, LOW_RANK),
    ("fira", {}, LOW_RANK),
    ("apollo", {}, LOW_RANK),
]


@pytest.mark.parametrize(
    ("source", "settings", "group"), OPTION_CASES, ids=[f"{c[0]}-{[*c[1], *c[2]][0]}" for c in OPTION_CASES]
)
def test_the_settings_that_read_across_elements_do_and_are_refused(source, settings, group):
    gap, moved = halves_gap(source)
    assert gap <= ELEMENTWISE_RTOL * moved
    gap, moved = halves_gap(source, settings, group)
    assert gap > ACROSS_RTOL * moved, (gap, moved)
    rules = [{"match": ".", **group}] if group else []
    cfg = optiplug.parse_optimizer(PREFIX + source, **settings, **({"param_groups": rules} if rules else {}))
    assert sharding.reads_across(source, cfg) is not None
    with pytest.raises(optiplug.ConfigError, match=r"reads across each weight tensor"):
        sharding.check(_context("deepspeed", 2), cfg)


# ---- the check, with the engine as the Trainer reports it ----------------------------------------------------


def _context(engine: str, stage: int | None = None) -> optiplug.BuildContext:
    """A build context whose trainer runs ``engine`` (as accelerate reports it: the flags the check reads)."""
    from optiplug.testing import tiny_llama

    args = SimpleNamespace(world_size=2, deepspeed={"zero_optimization": {"stage": stage}} if stage is not None else None,
                           hf_deepspeed_config=None, fsdp_config={"version": 2}, fsdp="full_shard")  # fmt: skip
    trainer = SimpleNamespace(accelerator=object(), is_deepspeed_enabled=engine == "deepspeed",
                              is_fsdp_enabled=engine == "fsdp")  # fmt: skip
    return optiplug.BuildContext(model=tiny_llama(), trainer=trainer, args=args)  # type: ignore[arg-type]


def test_refusals_say_what_the_optimizer_reads_and_what_to_train_with():
    lamb = optiplug.parse_optimizer("po_lamb")
    with pytest.raises(optiplug.ConfigError) as error:
        sharding.check(_context("deepspeed", 2), lamb)
    assert str(error.value) == (
        "po_lamb reads across each weight tensor (the trust ratio: each weight's norm over its update's norm), and "
        "DeepSpeed (ZeRO stage 2) hands the optimizer flattened 1-D partitions of the weights, cut at arbitrary "
        "elements; train with DDP or a single process"
    )
    with pytest.raises(optiplug.ConfigError) as error:
        sharding.check(_context("fsdp"), optiplug.parse_optimizer("po_muon"))
    assert str(error.value) == (
        "po_muon reads across each weight tensor (Newton–Schulz orthogonalization of each weight matrix (Muon's "
        "family)), which FSDP splits into row shards across the processes; train with optiplug's muon (it trains "
        "under FSDP2 and DeepSpeed), DDP or a single process"
    )
    with pytest.raises(optiplug.ConfigError) as error:
        sharding.check(_context("deepspeed", 3), optiplug.parse_optimizer("po_schedulefreeadamw"))
    assert str(error.value) == (
        "po_schedulefreeadamw: under DeepSpeed its train/eval switch moves the fp32 partitions DeepSpeed steps, not "
        "the model's weights, so evaluations and saved models would be at the training point y, not x: use optiplug's "
        "schedule_free_adamw, which carries the switch into the weights"
    )


@pytest.mark.parametrize("engine", ["deepspeed", "fsdp"])
def test_under_sharded_engines_exactly_the_elementwise_optimizers_pass(engine):
    ctx = _context(engine, 2 if engine == "deepspeed" else None)
    passed = set()
    for source in SOURCES:
        entry = optiplug.get_entry(PREFIX + source)
        try:
            sharding.check(ctx, entry.config())
        except optiplug.ConfigError:
            continue
        passed.add(source)
    expected = sharding.ELEMENTWISE - (set(sharding.DEEPSPEED_ONLY) if engine == "deepspeed" else set())
    assert passed == expected


def test_without_a_sharded_engine_nothing_is_refused():
    for engine in ("ddp", "none"):
        ctx = _context(engine)
        for source in ("lamb", "muon", "soap", "adafactor"):
            sharding.check(ctx, optiplug.parse_optimizer(PREFIX + source))


def test_every_bridged_entry_runs_the_sharding_check():
    for source in SOURCES:
        assert optiplug.get_entry(PREFIX + source).check is not None, source


def test_under_fsdp_a_batched_step_dtensors_lack_is_left_for_the_per_tensor_one():
    entry = optiplug.get_entry("po_adan")
    fsdp = _context("fsdp")
    assert entry.build(fsdp, entry.config()).defaults["foreach"] is False
    assert entry.build(optiplug.BuildContext(model=fsdp.model), entry.config()).defaults["foreach"] is None
    with pytest.raises(optiplug.ConfigError) as error:
        sharding.check(fsdp, entry.config(foreach=True))
    assert str(error.value) == (
        "po_adan: its batched step (foreach: true) calls torch._foreach_copy_, which FSDP's DTensor parameters do not "
        "support: leave optimizer.foreach unset (under FSDP the bridge then takes its per-tensor step)"
    )
