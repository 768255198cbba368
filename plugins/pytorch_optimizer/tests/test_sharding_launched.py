"""The bridge under sharded engines with two real processes (gloo, CPU), for a sample of the catalogue, in the
shared "deepspeed" and "fsdp2" launches of :mod:`optiplug.testing_launch`.

Elementwise optimizers train: through the Trainer under DeepSpeed ZeRO-1, 2 and 3 (the losses of one process
at the same global batch; one resumed from a checkpoint), and on ``fully_shard``-ed models under FSDP2: every
elementwise optimizer of the catalogue a few steps on a small model (the weights of one process), and two
side by side with one process on the tiny Llama (losses, weights, exact resume through DCP, half the state
per process). The ones that read across a tensor
are refused by the real Trainer's check before any step, with the sentence (``po_muon`` under ZeRO-2 used to
train "successfully" on flat partitions). The whole catalogue is classified and tested tensor-level in
test_sharding.py.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pytest
from optiplug_pytorch_optimizer.catalogue import PREFIX

import optiplug
from optiplug.testing_launch import check_side_by_side, fsdp2_side_by_side, launch_root, launched_case

pytestmark = pytest.mark.slow

STEPS, BATCH = 4, 2
EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
# (optimizer, ZeRO stage) trained through the Trainer; the first is also resumed from its checkpoint at step 2
ZERO_SAMPLE = [("po_adan", 2), ("po_lion", 2), ("po_adopt", 3), ("po_ademamix", 1)]
# refused under ZeRO-2 (po_schedulefreeadamw: under ZeRO-3), with the start of each sentence
REFUSED = {
    "po_muon": "po_muon reads across each weight tensor (Newton–Schulz orthogonalization of each weight matrix",
    "po_soap": "po_soap reads across each weight tensor (eigenbases of each matrix's row and column statistics",
    "po_adafactor": "po_adafactor reads across each weight tensor (factored second moments",
    "po_lamb": "po_lamb reads across each weight tensor (the trust ratio",
    "po_schedulefreeadamw": "po_schedulefreeadamw: under DeepSpeed its train/eval switch moves the fp32 partitions",
    "po_madgrad": "po_madgrad: under DeepSpeed it keeps one step count for all its parameter groups",
}
FSDP2_SAMPLE = {"po_lion": "Lion", "po_adan": "Adan"}  # trained side by side, checkpointed and resumed
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")


def zero(stage: int) -> dict[str, Any]:
    config = json.loads((EXAMPLES / f"deepspeed-zero{3 if stage == 3 else 2}.json").read_text())
    config["zero_optimization"]["stage"] = stage
    return config


def run(name: str, output_dir: Path, batch: int, resume: str | None = None, **arguments: Any) -> dict[int, float]:
    from optiplug.testing import TokenBlocks, logged_losses, tiny_llama, training_args

    args = training_args(output_dir, max_steps=STEPS, per_device_train_batch_size=batch, **arguments)
    trainer = optiplug.OptiTrainer(model=tiny_llama(seed=0), args=args, train_dataset=TokenBlocks(n=64), optimizer=name)
    trainer.train(resume_from_checkpoint=resume)
    return logged_losses(trainer)


# ---- the cases (every process of the launches) ---------------------------------------------------------------


@launched_case("deepspeed")
def bridge_sample_under_zero():
    results: dict[str, Any] = {}
    for index, (name, stage) in enumerate(ZERO_SAMPLE):
        out = launch_root() / "bridge" / f"{name}-zero{stage}"
        saving = {"save_strategy": "steps", "save_steps": STEPS // 2} if index == 0 else {}
        results[name] = {"stage": stage, "losses": run(name, out, BATCH, deepspeed=zero(stage), **saving)}
        if index == 0:
            resumed = run(name, out.with_name(out.name + "-resumed"), BATCH, str(out / f"checkpoint-{STEPS // 2}"),
                          deepspeed=zero(stage))  # fmt: skip
            results[name]["resumed"] = {step: loss for step, loss in resumed.items() if step > STEPS // 2}
    return results


@launched_case("deepspeed")
def bridge_refusals_under_zero():
    from optiplug.testing import tiny_llama, training_args

    refused = {}
    for name in REFUSED:
        stage = 3 if name == "po_schedulefreeadamw" else 2
        args = training_args(launch_root() / "bridge" / "refused", deepspeed=zero(stage))
        trainer = optiplug.OptiTrainer(model=tiny_llama(seed=0), args=args, optimizer=name)
        try:
            trainer.check_optimizer()
            refused[name] = None
        except optiplug.ConfigError as error:
            refused[name] = str(error)
    return refused


@launched_case("fsdp2")
def bridge_sample_under_fully_shard():
    return {name: fsdp2_side_by_side({"name": name}, name=f"bridge-{name}") for name in FSDP2_SAMPLE}


@launched_case("fsdp2")
def every_elementwise_bridged_optimizer_under_fully_shard():
    """Eight steps of each on a fully_shard-ed two-layer network and on an unsharded copy with the whole batch."""
    import torch
    import torch.distributed as dist
    from optiplug_pytorch_optimizer import sharding
    from torch.distributed.fsdp import fully_shard

    def network() -> Any:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 6))

    rank, generator = dist.get_rank(), torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 8, generator=generator) for _ in range(8)]  # RAdam rectifies from step 6
    results = {}
    for source in sorted(sharding.ELEMENTWISE):
        sharded, single, start = network(), network(), network()
        for module in (sharded[0], sharded[2], sharded):
            fully_shard(module)
        try:
            optimizers = [optiplug.build_optimizer(model, PREFIX + source) for model in (sharded, single)]
            for batch in batches:
                for model, optimizer, rows in zip(
                    (sharded, single), optimizers, (batch[rank * 4 : rank * 4 + 4], batch)
                ):
                    model(rows).square().mean().backward()
                    optimizer.step()
                    optimizer.zero_grad()
        except Exception as error:  # reported by the test, with the optimizer's name
            results[source] = {"error": f"{type(error).__name__}: {error}"}
            continue
        pairs = list(zip(sharded.parameters(), single.parameters(), start.parameters()))
        results[source] = {
            "gap": max((p.full_tensor() - q).abs().max().item() for p, q, _ in pairs),
            "moved": max((q - r).abs().max().item() for _, q, r in pairs),
        }
    return results


@launched_case("fsdp2")
def bridge_refusal_on_a_fully_shard_model():
    from torch.distributed.fsdp import fully_shard

    from optiplug.testing import tiny_llama

    model = tiny_llama(seed=0)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    try:
        optiplug.build_optimizer(model, "po_lamb")
    except optiplug.ConfigError as error:
        return str(error)
    return None


# ---- the tests --------------------------------------------------------------------------------------------


@needs_deepspeed
@pytest.mark.parametrize(("name", "stage"), ZERO_SAMPLE)
def test_elementwise_bridged_optimizers_train_under_zero_as_one_process(deepspeed, tmp_path, name, stage):
    import torch

    got = deepspeed[bridge_sample_under_zero][0][name]
    assert got["stage"] == stage
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = run(name, tmp_path, 2 * BATCH)
    finally:
        torch.set_num_threads(threads)
    assert sorted(int(step) for step in got["losses"]) == sorted(single) == list(range(1, STEPS + 1))
    for step, loss in single.items():
        assert math.isclose(got["losses"][str(step)], loss, rel_tol=1e-5), (step, got["losses"], single)


@needs_deepspeed
def test_a_bridged_optimizer_resumes_exactly_under_zero(deepspeed):
    name = ZERO_SAMPLE[0][0]
    got = deepspeed[bridge_sample_under_zero][0][name]
    assert sorted(got["resumed"]) == [str(step) for step in range(STEPS // 2 + 1, STEPS + 1)]
    assert all(loss == got["losses"][step] for step, loss in got["resumed"].items()), got


@needs_deepspeed
def test_cross_element_bridged_optimizers_are_refused_by_the_trainer_under_zero(deepspeed):
    for refused in deepspeed[bridge_refusals_under_zero]:
        for name, start in REFUSED.items():
            assert refused[name] is not None and refused[name].startswith(start), (name, refused[name])


@pytest.mark.parametrize("name", FSDP2_SAMPLE)
def test_elementwise_bridged_optimizers_train_under_fsdp2_as_one_process(fsdp2, name):
    per_process = [results[name] for results in fsdp2[bridge_sample_under_fully_shard]]
    check_side_by_side(per_process, cls=FSDP2_SAMPLE[name])


def test_every_elementwise_bridged_optimizer_trains_under_fsdp2_as_one_process(fsdp2):
    from optiplug_pytorch_optimizer import sharding

    got, _ = fsdp2[every_elementwise_bridged_optimizer_under_fully_shard]
    assert set(got) == sharding.ELEMENTWISE
    failed = {source: result for source, result in got.items() if "error" in result}
    assert not failed, failed
    for source, result in got.items():
        assert result["moved"] > 1e-5 and result["gap"] <= 1e-6 * max(1.0, result["moved"]), (source, result)


def test_cross_element_bridged_optimizers_are_refused_on_a_fully_shard_model(fsdp2):
    for message in fsdp2[bridge_refusal_on_a_fully_shard_model]:
        assert message == (
            "po_lamb reads across each weight tensor (the trust ratio: each weight's norm over its update's norm), "
            "which FSDP splits into row shards across the processes; train with DDP or a single process"
        )
