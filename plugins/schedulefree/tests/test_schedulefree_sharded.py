"""Schedule-free on sharded engines, two real processes (torchrun, gloo) on this CPU machine.

The cases run in the shared launches of :mod:`optiplug.testing_launch` ("deepspeed" and "fsdp2": one
torchrun start each for every test module's cases).

* DeepSpeed ZeRO-1, 2 and 3 through the Trainer (OptiTrainer with a DeepSpeed config): DeepSpeed steps
  fp32 partitions, so the plugin pushes every switch into the model's weights. Asserted: the per-step
  losses are one process's at the same global batch; every saved model (each checkpoint, and the output
  directory after training) is x, the one-process run's x to float rounding and far from y; resuming from
  a checkpoint logs the uninterrupted run's losses exactly; each rank holds half the optimizer state.
* FSDP2 (``fully_shard``, DTensor parameters) on the model directly (accelerate enables FSDP only on GPUs):
  the same losses, the gathered full state dict in eval mode is x, the switch back gives y bit for bit, and a
  checkpoint written with torch's distributed checkpoint (x as the weights, y in the optimizer state)
  resumes exactly.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

import optiplug
from optiplug.testing_launch import launch_root, launched_case

STEPS, BATCH, SAVE = 4, 2, 2
BETA1 = 0.9  # the weight of x in y: x = lerp(y, z, 1 - 1 / BETA1)
OPTIMIZER = {
    "name": "schedule_free_adamw",
    "lr": 1e-2,
    "betas": (BETA1, 0.999),
    "warmup_steps": 2,
    "weight_decay": 0.01,
}
# the other two share the engine code: each trained under FSDP2 and one ZeRO stage (the same weight of x in y)
OTHERS = {
    "schedule_free_radam": {"name": "schedule_free_radam", "lr": 1e-2, "betas": (BETA1, 0.999), "weight_decay": 0.01},
    "schedule_free_sgd": {"name": "schedule_free_sgd", "lr": 1e-2, "momentum": BETA1, "warmup_steps": 2,
                          "weight_decay": 0.01},
}  # fmt: skip
OTHER_STAGES = {"schedule_free_radam": 1, "schedule_free_sgd": 3}
STAGES = (1, 2, 3)
RTOL = 1e-5  # two processes vs one: only the order of the gradient reduction differs (~1e-7 measured)
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def zero(stage: int) -> dict[str, Any]:
    """The repository's example DeepSpeed config (``auto`` values filled by transformers), at ``stage``."""
    config = json.loads((EXAMPLES / f"deepspeed-zero{3 if stage == 3 else 2}.json").read_text())
    config["zero_optimization"]["stage"] = stage
    return config


def trainer(output_dir: Path, batch: int, optimizer: dict[str, Any] = OPTIMIZER, **arguments: Any):
    from optiplug.testing import TokenBlocks, tiny_llama, training_args

    args = training_args(output_dir, max_steps=STEPS, per_device_train_batch_size=batch, **arguments)
    return optiplug.OptiTrainer(
        model=tiny_llama(seed=0), args=args, train_dataset=TokenBlocks(n=64), optimizer=optimizer, scheduler="constant"
    )


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict[str, Any]:
    return one_process(tmp_path_factory.mktemp("single"), OPTIMIZER)


def one_process(out: Path, optimizer: dict[str, Any]) -> dict[str, Any]:
    """One process, twice the batch, a checkpoint every SAVE steps; x and y at each save, x at the end."""
    import torch
    from optiplug_schedulefree.optim import schedule_free_optimizer
    from transformers import TrainerCallback

    from optiplug.testing import logged_losses

    points: dict[int, dict[str, dict[str, torch.Tensor]]] = {}

    class Points(TrainerCallback):
        def on_save(self, args, state, control, model=None, optimizer=None, **kwargs):
            raw = schedule_free_optimizer(optimizer)
            y = {n: p.detach().clone() for n, p in model.named_parameters()}
            raw.eval()
            x = {n: p.detach().clone() for n, p in model.named_parameters()}
            raw.train()
            points[state.global_step] = {"x": x, "y": y}

    run = trainer(out, 2 * BATCH, optimizer, save_strategy="steps", save_steps=SAVE)
    run.add_callback(Points())
    torch.set_num_threads(1)
    run.train()
    final = {n: p.detach().clone() for n, p in run.model.named_parameters()}  # x: the callback's eval() at the end
    return {"losses": logged_losses(run), "points": points, "final": final,
            "state_bytes": optiplug.optimizer_state_bytes(schedule_free_optimizer(run.optimizer))}  # fmt: skip


def assert_close_losses(got: dict[Any, float], expected: dict[int, float]) -> None:
    got = {int(step): loss for step, loss in got.items()}
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    for step, loss in expected.items():
        assert math.isclose(got[step], loss, rel_tol=RTOL), (step, got[step], loss)


def assert_is_x(saved: dict[str, Any], point: dict[str, dict[str, Any]], where: str) -> None:
    """``saved`` is the one-process x to float rounding, and much further from y than that."""
    import torch

    assert saved.keys() == point["x"].keys(), where
    to_x = max((saved[n] - point["x"][n]).abs().max().item() for n in saved)
    to_y = max((saved[n] - point["y"][n]).abs().max().item() for n in saved)
    assert to_x < 1e-5, f"{where} is not x (max difference {to_x:.3g})"
    assert to_y > 100 * max(to_x, 1e-7), f"{where} is as close to y ({to_y:.3g}) as to x ({to_x:.3g})"
    assert all(torch.allclose(saved[n], point["x"][n], rtol=1e-4, atol=1e-6) for n in saved), where


def estimated_share(engine: str) -> int:
    """``optiplug estimate``'s optimizer state of one process of 2 under ``engine``, for the tiny Llama."""
    from optiplug.app.estimate import ModelShapes, estimate_shapes
    from optiplug.testing import tiny_llama

    [row] = estimate_shapes(
        ModelShapes.of_model(tiny_llama()), [optiplug.parse_optimizer(OPTIMIZER)], None, 1, 2, engine
    )
    assert row.state_bytes is not None
    return row.state_bytes


def load_weights(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


# ---- the cases: every process of the shared launches ----------------------------------------------------


def _deepspeed(stage: int, optimizer: dict[str, Any] = OPTIMIZER) -> dict[str, Any]:
    from optiplug_schedulefree.optim import schedule_free_optimizer

    from optiplug.testing import logged_losses

    root = launch_root() / "schedulefree"
    out = root / (f"zero{stage}" if optimizer is OPTIMIZER else f"{optimizer['name']}-zero{stage}")
    run = trainer(out, BATCH, optimizer, deepspeed=zero(stage), save_strategy="steps", save_steps=SAVE)
    saves = _saved_is_x_class()(run, out)
    run.add_callback(saves)
    run.train()
    run.save_model(str(out / "final"))  # after train(): the model holds x (ZeRO-3 gathers it from the partitions)
    raw = schedule_free_optimizer(run.optimizer)
    with raw.engine.exposed():  # ZeRO-3's groups hold the partitions only while DeepSpeed steps or saves them
        mine = optiplug.optimizer_state_bytes(raw)  # z, the second moment and y (what a checkpoint holds)
    result = {
        "losses": logged_losses(run), "world_size": run.args.world_size, "engine": type(run.model_wrapped).__name__,
        "stage": run.optiplug_context().deepspeed_stage, "state_bytes": mine,
        "saved_is_x": saves.exact, "group_steps": [group["k"] for group in raw.param_groups], "out": str(out),
    }  # fmt: skip
    del run, raw
    resumed = trainer(out.parent / f"{out.name}-resumed", BATCH, optimizer, deepspeed=zero(stage))
    resumed.train(resume_from_checkpoint=str(out / f"checkpoint-{SAVE}"))
    result["resumed"] = {step: loss for step, loss in logged_losses(resumed).items() if step > SAVE}
    return result


@launched_case("deepspeed")
def schedule_free_zero1():
    return _deepspeed(1)


@launched_case("deepspeed")
def schedule_free_zero2():
    return _deepspeed(2)


@launched_case("deepspeed")
def schedule_free_zero3():
    return _deepspeed(3)


ZERO_CASES = {1: schedule_free_zero1, 2: schedule_free_zero2, 3: schedule_free_zero3}


@launched_case("deepspeed")
def schedule_free_zero3_split_groups():
    """ZeRO-3 with a sub-group size that splits each parameter group into several steps: refused at train()."""
    import optiplug

    config = zero(3)
    config["zero_optimization"]["sub_group_size"] = 1000
    run = trainer(launch_root() / "schedulefree" / "zero3-split", BATCH, deepspeed=config)
    try:
        run.train()
    except optiplug.ConfigError as error:
        return str(error)
    return None


@launched_case("fsdp2")
def schedule_free_under_fully_shard():
    return _fully_shard(launch_root() / "schedulefree")


@launched_case("deepspeed")
def schedule_free_radam_and_sgd_under_zero():
    return {name: _deepspeed(OTHER_STAGES[name], optimizer) for name, optimizer in OTHERS.items()}


@launched_case("fsdp2")
def schedule_free_radam_and_sgd_under_fully_shard():
    return {name: _fully_shard(launch_root() / name, optimizer) for name, optimizer in OTHERS.items()}


# ---- DeepSpeed ZeRO-1/2/3 through the Trainer ----------------------------------------------------------

needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (pip install deepspeed)")


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_losses_match_one_process(deepspeed, single, stage):
    for got in deepspeed[ZERO_CASES[stage]]:
        assert got["engine"] == "DeepSpeedEngine" and got["world_size"] == 2 and got["stage"] == stage
        assert_close_losses(got["losses"], single["losses"])
        # each group's step count advanced once per step (ZeRO-3 steps the optimizer once per group)
        assert got["group_steps"] == [STEPS, STEPS]


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_every_saved_model_is_x(deepspeed, single, stage):
    got, _ = deepspeed[ZERO_CASES[stage]]
    # exactly: upstream's x = lerp(y, z, 1 - 1/beta1) from DeepSpeed's gathered fp32 weights and state
    assert got["saved_is_x"] == {str(step): True for step in range(SAVE, STEPS + 1, SAVE)}
    # and the one-process run's x, to float rounding (far from its y)
    out = Path(got["out"])
    for step in range(SAVE, STEPS + 1, SAVE):
        assert_is_x(load_weights(out / f"checkpoint-{step}"), single["points"][step], f"zero{stage} checkpoint-{step}")
    final = {"x": single["final"], "y": single["points"][STEPS]["y"]}
    assert_is_x(load_weights(out / "final"), final, f"zero{stage} output directory")


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_resume_is_exact(deepspeed, stage):
    for got in deepspeed[ZERO_CASES[stage]]:
        resumed = {int(step): loss for step, loss in got["resumed"].items()}
        assert sorted(resumed) == list(range(SAVE + 1, STEPS + 1))
        assert all(resumed[step] == got["losses"][str(step)] for step in resumed), (resumed, got["losses"])


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_each_rank_holds_half_the_state(deepspeed, single, stage):
    per_rank = [got["state_bytes"] for got in deepspeed[ZERO_CASES[stage]]]
    # DeepSpeed pads each flat group to a multiple of the world size (and an alignment): a few elements
    assert all(abs(b - single["state_bytes"] / 2) <= 0.01 * single["state_bytes"] for b in per_rank), per_rank
    assert sum(per_rank) >= single["state_bytes"]
    assert all(abs(b - estimated_share(f"zero{stage}")) <= 0.01 * b for b in per_rank), per_rank  # optiplug estimate


@pytest.mark.slow
@needs_deepspeed
def test_deepspeed_zero3_sub_groups_that_split_a_group_are_refused(deepspeed):
    for message in deepspeed[schedule_free_zero3_split_groups]:
        assert re.fullmatch(
            r"schedule_free_adamw: DeepSpeed ZeRO-3 splits its 2 parameter groups into \d+ sub-groups and steps each "
            r"one separately, which would advance schedule-free's per-group step count several times per step: raise "
            r"zero_optimization.sub_group_size above the largest group's number of parameters",
            message or "",
        ), message


# ---- FSDP2 (fully_shard) on the model directly -----------------------------------------------------------


@pytest.mark.slow
def test_fsdp2_losses_match_one_process_and_resume_is_exact(fsdp2):
    got, _ = fsdp2[schedule_free_under_fully_shard]
    assert got["parameter_type"] == "DTensor"
    assert_close_losses(dict(enumerate(got["sharded"], 1)), dict(enumerate(got["single"], 1)))
    assert got["resumed"] == got["sharded"][SAVE:]  # exact: the same floats


@pytest.mark.slow
def test_fsdp2_gathered_model_is_x_and_the_switch_back_is_exact(fsdp2):
    for got in fsdp2[schedule_free_under_fully_shard]:
        assert got["gathered_is_x"] is True  # upstream's formula on the gathered y and z, for equality
        # two processes against one: x agrees to 3.1e-6 after 2 steps, y is 2.8e-4 away (measured; the exact check of
        # x is gathered_is_x above)
        assert got["gathered_to_x"] < 1e-5 and got["gathered_to_y"] > 30 * max(got["gathered_to_x"], 1e-7), got
        assert got["y_back_bit_for_bit"] is True
        assert got["checked_engine"] == "fsdp"  # the plugin's check ran on the sharded model and let it train


@pytest.mark.slow
def test_fsdp2_each_rank_holds_half_the_state(fsdp2):
    for got in fsdp2[schedule_free_under_fully_shard]:
        state = got["state_bytes"]
        assert abs(state["sharded"] - state["single"] / 2) <= 0.01 * state["single"], state
        assert abs(state["sharded"] - estimated_share("fsdp")) <= 0.01 * state["sharded"], state  # optiplug estimate


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OTHERS))
def test_radam_and_sgd_under_fsdp2_match_one_process_resume_exactly_and_gather_x(fsdp2, name):
    for got in (result[name] for result in fsdp2[schedule_free_radam_and_sgd_under_fully_shard]):
        assert_close_losses(dict(enumerate(got["sharded"], 1)), dict(enumerate(got["single"], 1)))
        assert got["resumed"] == got["sharded"][SAVE:]
        assert got["gathered_is_x"] is True and got["y_back_bit_for_bit"] is True
        state = got["state_bytes"]
        assert abs(state["sharded"] - state["single"] / 2) <= 0.01 * state["single"], state


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("name", list(OTHERS))
def test_radam_and_sgd_under_zero_match_one_process_save_x_and_resume_exactly(deepspeed, name, tmp_path):
    reference = one_process(tmp_path, OTHERS[name])
    per_rank = [result[name] for result in deepspeed[schedule_free_radam_and_sgd_under_zero]]
    # process 0 compared each checkpoint's weights with x from DeepSpeed's gathered y and z
    assert per_rank[0]["saved_is_x"] == {str(step): True for step in range(SAVE, STEPS + 1, SAVE)}
    for got in per_rank:
        assert got["stage"] == OTHER_STAGES[name] and got["group_steps"] == [STEPS, STEPS]
        assert_close_losses(got["losses"], reference["losses"])
        resumed = {int(step): loss for step, loss in got["resumed"].items()}
        assert resumed and all(resumed[step] == got["losses"][str(step)] for step in resumed), resumed
        assert abs(got["state_bytes"] - reference["state_bytes"] / 2) <= 0.01 * reference["state_bytes"]


# ---- helpers of the cases --------------------------------------------------------------------------------


def _saved_is_x_class() -> type:
    from transformers import TrainerCallback

    class SavedIsX(TrainerCallback):
        """After each checkpoint (every rank): x by upstream's formula, ``lerp(y, z, 1 - 1/beta1)``, from DeepSpeed's
        full fp32 weights (y: training resumed after the save) and z, gathered from the partitions; rank 0 compares
        it with the checkpoint's weights, for equality."""

        def __init__(self, run: Any, out: Path) -> None:
            self.run, self.out, self.exact = run, out, {}

        def on_save(self, args, state, control, **kwargs):
            import torch
            from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

            engine_optimizer = self.run.model_wrapped.optimizer
            if hasattr(engine_optimizer, "_hp_optimizer_states_linked"):
                # ZeRO-1/2 links each weight to its optimizer state once, after the first group's first step, when
                # the later groups have no state yet (a DeepSpeed quirk for any lazily created state): link again
                engine_optimizer._hp_optimizer_states_linked = False
                engine_optimizer._lazy_init_hp_params_optimizer_state()
            weight = 1 - 1 / BETA1
            x = {}
            for name, p in self.run.model.named_parameters():
                y, z = safe_get_full_fp32_param(p), safe_get_full_optimizer_state(p, "z")
                x[name] = torch.lerp(y, z, weight)
            if args.process_index == 0:
                saved = load_weights(self.out / f"checkpoint-{state.global_step}")
                self.exact[state.global_step] = saved.keys() == x.keys() and all(
                    torch.equal(saved[n], x[n].view_as(saved[n])) for n in x
                )

    return SavedIsX


def _fully_shard(root: Path, optimizer_config: dict[str, Any] = OPTIMIZER) -> dict[str, Any]:
    """A plain loop on a fully_shard-ed model and on an unsharded copy (twice the batch); DCP checkpoint at SAVE."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.fsdp import fully_shard

    import optiplug
    from optiplug.testing import TokenBlocks, tiny_llama

    rank, world = dist.get_rank(), dist.get_world_size()
    data = TokenBlocks(n=64)
    name, settings = optimizer_config["name"], {k: v for k, v in optimizer_config.items() if k != "name"}

    def shard(model: Any) -> Any:
        for layer in model.model.layers:
            fully_shard(layer)
        return fully_shard(model)

    def batch(step: int) -> Any:
        return torch.stack([data[i]["input_ids"] for i in range(step * world * BATCH, (step + 1) * world * BATCH)])

    def take_step(model: Any, optimizer: Any, ids: Any, mean: bool) -> float:
        optimizer.train()  # what the Trainer does before every step
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss = loss.detach()
        if mean:
            dist.all_reduce(loss)
            loss /= world
        return loss.item()

    sharded, single = shard(tiny_llama(seed=0)), tiny_llama(seed=0)
    optimizer = optiplug.build_optimizer(sharded, name, **settings)  # the plugin's check runs here
    reference = optiplug.build_optimizer(single, name, **settings)
    result: dict[str, Any] = {"sharded": [], "single": [], "parameter_type": type(next(sharded.parameters())).__name__}
    result["checked_engine"] = optiplug.BuildContext(model=sharded).distributed
    full = StateDictOptions(full_state_dict=True)  # every rank gets the full tensors (cpu_offload: rank 0 only)
    for step in range(STEPS):
        ids = batch(step)
        result["sharded"].append(take_step(sharded, optimizer, ids[rank * BATCH : (rank + 1) * BATCH], mean=True))
        result["single"].append(take_step(single, reference, ids, mean=False))
        if step + 1 == SAVE:
            y_local = [p.detach().to_local().clone() for p in sharded.parameters()]
            y_full = get_model_state_dict(sharded, options=full)
            z_full = {n: optimizer.state[p]["z"].full_tensor() for n, p in sharded.named_parameters()}
            y_single = {n: p.detach().clone() for n, p in single.named_parameters()}
            optimizer.eval()
            reference.eval()
            gathered = get_model_state_dict(sharded, options=full)  # what a saved full model holds
            x_single = dict(single.named_parameters())
            result["gathered_to_x"] = max((gathered[n] - x_single[n]).abs().max().item() for n in x_single)
            result["gathered_to_y"] = max((gathered[n] - y_single[n]).abs().max().item() for n in y_single)
            weight = 1 - 1 / BETA1
            result["gathered_is_x"] = all(
                torch.equal(gathered[n], torch.lerp(y_full[n], z_full[n], weight)) for n in z_full
            )
            dcp.save({"model": get_model_state_dict(sharded)}, checkpoint_id=str(root / "model"))
            optimizer.train()
            reference.train()
            result["y_back_bit_for_bit"] = all(
                torch.equal(p.detach().to_local(), y) for p, y in zip(sharded.parameters(), y_local)
            )
            dcp.save({"optim": get_optimizer_state_dict(sharded, optimizer)}, checkpoint_id=str(root / "optim"))
    result["state_bytes"] = {
        "sharded": optiplug.optimizer_state_bytes(optimizer),  # this process's shards (DTensors count their shard)
        "single": optiplug.optimizer_state_bytes(reference),
    }

    # resume: a fresh sharded model and optimizer, the checkpoint's x as weights and its optimizer state (with y)
    model = shard(tiny_llama(seed=1))
    weights = {"model": get_model_state_dict(model)}
    dcp.load(weights, checkpoint_id=str(root / "model"))
    set_model_state_dict(model, weights["model"])
    resumed = optiplug.build_optimizer(model, name, **settings)
    state = {"optim": get_optimizer_state_dict(model, resumed)}
    dcp.load(state, checkpoint_id=str(root / "optim"))
    set_optimizer_state_dict(model, resumed, state["optim"])
    result["resumed"] = []
    for step in range(SAVE, STEPS):
        ids = batch(step)
        result["resumed"].append(take_step(model, resumed, ids[rank * BATCH : (rank + 1) * BATCH], mean=True))
    return result
