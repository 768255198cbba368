"""Registry-wide tests: every registered optimizer (every installed plugin's) trains and resumes exactly.

A new plugin is covered by installing it: these tests are parametrized over the registry.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import optiplug
from optiplug.testing import TokenBlocks, logged_losses, tiny_llama, training_args


def _schedule(name: str, warmup_steps: int) -> str | dict:
    """The scheduler the tests train ``name`` with: its own (schedule-free: constant), else cosine with warmup."""
    own = optiplug.get_entry(name).default_scheduler
    return own if own is not None else {"name": "cosine", "warmup_steps": warmup_steps}


def _usable(name: str):
    """Parameters for one optimizer: skipped (with the entry's own reason) where its check refuses this machine."""
    from transformers import TrainingArguments

    entry = optiplug.get_entry(name)
    schedule = _schedule(name, 2)
    try:
        entry.check_requires()
        if entry.check is not None:
            args = TrainingArguments(
                output_dir="/tmp/optiplug-probe",
                use_cpu=True,
                report_to="none",
                lr_scheduler_type=schedule if isinstance(schedule, str) else schedule["name"],
            )
            entry.check(optiplug.BuildContext(model=tiny_llama(), args=args), entry.config())
    except optiplug.OptiplugError as error:
        return pytest.param(name, marks=pytest.mark.skip(reason=f"{name}: {error}"))
    return name


# optiplug-pytorch-optimizer bridges ~110 optimizers: its own tests step and resume every one of them at the tensor
# level (plugins/pytorch_optimizer/tests); this fixed sample of them goes through the Trainer here.
BRIDGE, BRIDGE_SAMPLE = "optiplug-pytorch-optimizer", {"po_lion", "po_muon", "po_prodigy", "po_soap"}


def every_optimizer():
    rows = optiplug.list_optimizers()
    return [_usable(row.name) for row in rows if row.plugin != BRIDGE or row.name in BRIDGE_SAMPLE]


def _trainer(tmp_path, name: str, **arg_overrides):
    model = tiny_llama(seed=0)
    args = training_args(tmp_path, **arg_overrides)
    return optiplug.OptiTrainer(
        model=model,
        args=args,
        train_dataset=TokenBlocks(n=32, distinct=4),
        optimizer=name,
        scheduler=_schedule(name, 2),
    )


@pytest.mark.parametrize("name", every_optimizer())
def test_smoke_every_optimizer_learns(name, tmp_path):
    trainer = _trainer(tmp_path, name, max_steps=12)
    trainer.train()
    losses = list(logged_losses(trainer).values())
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert min(losses[-3:]) < losses[0], f"{name}: loss did not decrease: {losses}"


@pytest.mark.parametrize("name", every_optimizer())
def test_resume_every_optimizer_reproduces_the_uninterrupted_run(name, tmp_path):
    import torch

    steps = 8
    full = _trainer(tmp_path / "full", name, max_steps=steps, save_strategy="steps", save_steps=steps // 2)
    full.train()
    reference = logged_losses(full)
    checkpoint = Path(tmp_path / "full" / f"checkpoint-{steps // 2}")
    assert (checkpoint / "optimizer.pt").is_file()
    torch.load(checkpoint / "optimizer.pt", weights_only=True)  # must not need pickled classes

    resumed = _trainer(tmp_path / "resumed", name, max_steps=steps, save_strategy="no")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    after = {step: loss for step, loss in logged_losses(resumed).items() if step > steps // 2}
    assert sorted(after) == list(range(steps // 2 + 1, steps + 1))
    for step, loss in after.items():
        assert loss == reference[step], f"{name}: step {step}: resumed {loss} != uninterrupted {reference[step]}"


TWO_GROUPS = [{"match": "embed_tokens", "lr_scale": 0.5}, {"match": "lm_head", "lr_scale": 2.0, "name": "head"}]


@pytest.mark.parametrize("name", every_optimizer())
def test_two_parameter_groups_keep_their_rates_and_resume_exactly(name, tmp_path):
    """optimizer.param_groups for every optimizer: honoured (the scheduler keeps each group's rate in
    proportion, logged as lr/<label>) and resumed exactly, or refused with a sentence naming it."""
    steps = 6

    def trainer(path, **overrides):
        return optiplug.OptiTrainer(
            model=tiny_llama(seed=0),
            args=training_args(path, max_steps=steps, **overrides),
            train_dataset=TokenBlocks(n=32, distinct=4),
            optimizer={"name": name, "param_groups": TWO_GROUPS},
            scheduler=_schedule(name, 2),
        )

    full = trainer(tmp_path / "full", save_strategy="steps", save_steps=steps // 2)
    try:
        full.train()
    except optiplug.ConfigError as error:
        plugin = next(r.plugin for r in optiplug.list_optimizers() if r.name == name)
        ours = plugin in _first_party() or plugin.startswith("optiplug:")
        assert not ours or name in PARAM_GROUP_REFUSALS, f"{name}: {error}"
        assert "optimizer.param_groups" in str(error), f"{name}: a refusal must name optimizer.param_groups"
        pytest.skip(f"{name} refuses optimizer.param_groups: {error}")
    records = [r for r in full.state.log_history if "loss" in r]
    for label in ("lr/embed_tokens", "lr/head"):
        ratios = [r[label] / r["lr/default"] for r in records[1:]]
        assert ratios == pytest.approx([ratios[0]] * len(ratios), rel=1e-9), f"{name}: {label} not in proportion"
    reference = logged_losses(full)
    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / f"checkpoint-{steps // 2}"))
    after = {step: loss for step, loss in logged_losses(resumed).items() if step > steps // 2}
    assert after == {step: reference[step] for step in range(steps // 2 + 1, steps + 1)}, name


# This repository's optimizers that refuse optimizer.param_groups, and why (any other must honour them).
PARAM_GROUP_REFUSALS = {
    "lomo": "the update is fused into backward with one learning rate (upstream LOMO has one group)",
    "adalomo": "the update is fused into backward with one learning rate (upstream AdaLomo has one group)",
}


def _first_party() -> set[str]:
    """This repository's plugin distributions (plugins/*, named optiplug-*), found rather than listed.
    optiplug-pytorch-optimizer is not among them here: it bridges another package's optimizers, refusals and
    all (po_muon)."""
    plugins = {info.distribution for info in optiplug.registry.loaded_plugins() if info.distribution}
    return {name for name in plugins if name.startswith("optiplug-")} - {BRIDGE}


# Optimizers of this repository that these plain-model tests may skip, and why (their tests live elsewhere).
EXPECTED_REFUSALS = {"loraplus": "trains LoRA adapters only: covered on a LoRA model in tests/test_adapters.py"}


def test_skips_above_are_only_the_expected_refusals():
    """The parametrizations above skip what an entry's check refuses; a wrong refusal must not hide here."""
    rows = optiplug.list_optimizers()
    assert {"badam", "galore_adamw", "galore_adafactor", "galore_adamw8bit", "loraplus"} <= {r.name for r in rows}
    assert optiplug.registry.plugin_failures() == []
    first_party = _first_party()
    assert {"optiplug-badam", "optiplug-optimi"} <= first_party  # the oldest and the newest plugin, found
    ours = {r.name for r in rows if r.plugin.startswith("optiplug:") or r.plugin in first_party}
    skipped = {p.values[0] for p in every_optimizer() if not isinstance(p, str)}
    assert skipped & ours == set(EXPECTED_REFUSALS)


def every_per_parameter_optimizer():
    """The usable optimizers whose entry declares ``per_parameter=True``: ``layerwise: true`` must work for each."""
    return [p for p in every_optimizer() if optiplug.get_entry(p if isinstance(p, str) else p.values[0]).per_parameter]


@pytest.mark.parametrize("name", every_per_parameter_optimizer())
def test_every_per_parameter_optimizer_trains_layerwise_like_its_whole_step(name, tmp_path):
    from optiplug import unwrap_optimizer

    runs = {}
    for layerwise in (False, True):
        args = training_args(
            tmp_path / str(layerwise),
            max_steps=3,
            gradient_accumulation_steps=2,
            per_device_train_batch_size=2,
            max_grad_norm=0.0,  # layerwise clipping is per parameter: equal to the whole step's without clipping
        )
        trainer = optiplug.OptiTrainer(
            model=tiny_llama(seed=0),
            args=args,
            train_dataset=TokenBlocks(n=32, distinct=4),
            optimizer={"name": name, "layerwise": layerwise},
            scheduler=_schedule(name, 1),
        )
        trainer.train()
        runs[layerwise] = trainer
    whole, layerwise = runs[False], runs[True]
    assert optiplug.layerwise_stepper(layerwise.optimizer) is not None
    expected = list(logged_losses(whole).values())
    assert list(logged_losses(layerwise).values()) == pytest.approx(expected, rel=1e-6), name
    assert all(p.grad is None for p in layerwise.model.parameters())  # each freed by its hook
    states = [unwrap_optimizer(t.optimizer).state_dict()["state"] for t in (whole, layerwise)]
    assert len(states[1]) == len(states[0]) > 0  # every parameter's state, as the whole step keeps it
