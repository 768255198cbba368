"""muon under DeepSpeed ZeRO-0/1/2/3 on CPU: 2 processes (torchrun, gloo) through transformers' Trainer.

This file is also the worker: ``python -m torch.distributed.run --nproc_per_node 2 test_muon_deepspeed.py OUT``
runs every case in one launch (each launch costs a DeepSpeed start-up): each ZeRO stage trains STEPS steps with
a checkpoint half-way and resumes from it; ZeRO-3 also with the model built partitioned (``zero.Init``); one run
has its Muon tags stripped after the build (the silent fallback the engagement check must stop); and the
refusals are taken with real ``TrainingArguments``. Rank 0 writes what every rank saw to ``result.json``.

``TORCHDYNAMO_DISABLE=1`` in the launch: DeepSpeed wraps ``muon_update`` in ``torch.compile``, which would
compile it in every process (a minute here). One run, marked slow, keeps the compiler: ``optiplug train`` on
``examples/muon-deepspeed-zero3.yaml``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve()
ROOT = HERE.parents[3]
STEPS = 8
B = 2  # per-device batch of the 2-process runs; the 1-process reference uses 2 * B
STAGES = (0, 1, 2, 3)
# DeepSpeed runs Newton–Schulz in bfloat16, as torch.optim.Muon does, but normalizes by norm + 1e-7 (torch: by
# max(norm, 1e-7)) and sums gradients in another order: losses drift apart by a few bfloat16 roundings of the
# update. Measured here: at most 5.5e-4 relative over 20 steps (ZeRO-2 and ZeRO-3); half a bfloat16 ulp (2^-9)
# is the bound.
BF16_GAP = 2**-9
OPTIMIZER = {"name": "muon", "weight_decay": 0.05}
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
pytestmark = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (pip install deepspeed)")

REFUSALS = {
    "zero3 with reduce-scatter": "muon under DeepSpeed ZeRO-3: DeepSpeed runs Muon at stage 3 only without "
    'reduce-scatter (it raises "Muon and reduce scatter cannot be used together"): set "reduce_scatter": false in '
    "the DeepSpeed config's zero_optimization",
    "zero2 with clipping": "muon under DeepSpeed ZeRO-2: DeepSpeed clips after Newton–Schulz, on the norm of Muon's "
    "orthogonalized update (about sqrt(rows) per matrix), not of the gradient, so clipping at 1 would shrink every "
    "Muon step many times over: set max_grad_norm to 0 (and gradient_clipping in the DeepSpeed config, if it is a "
    "number)",
    "zero1 with spectral": "muon under DeepSpeed ZeRO-1 runs DeepSpeed's own Muon, which cannot honour adjust_lr "
    "'spectral' (its learning rate scale is sqrt(max(1, fan_out/fan_in))): leave this field at the default, or "
    "train without DeepSpeed",
}


def deepspeed_config(stage: int) -> dict[str, Any]:
    """examples/muon-deepspeed-zero3.json at ``stage`` (reduce-scatter as DeepSpeed's default below stage 3)."""
    config = json.loads((ROOT / "examples" / "muon-deepspeed-zero3.json").read_text())
    config["zero_optimization"] = {**config["zero_optimization"], "stage": stage}
    if stage < 3:
        config["zero_optimization"] = {"stage": stage}
    return config


def _trainer(output_dir: Path, batch: int, model: Any = None, **arguments: Any):
    import optiplug
    from optiplug.testing import TokenBlocks, tiny_llama, training_args

    args = training_args(output_dir, max_steps=STEPS, per_device_train_batch_size=batch, max_grad_norm=0.0,
                         **arguments)  # fmt: skip
    data = TokenBlocks(n=64, distinct=4)  # learnable: the loss falls from 4.9 to ~1 in STEPS steps
    return optiplug.OptiTrainer(model=model if model is not None else tiny_llama(seed=0), args=args,
                                train_dataset=data, optimizer=OPTIMIZER)  # fmt: skip


def _train(output_dir: Path, batch: int, resume: str | None = None, model: Any = None, **arguments: Any) -> dict:
    """Train; the losses, this process's Newton–Schulz work and its optimizer state bytes."""
    from optiplug_muon.engagement import tally

    import optiplug

    trainer = _trainer(output_dir, batch, model=model, **arguments)
    calls, flops = tally.calls, tally.flops
    trainer.train(resume_from_checkpoint=resume)
    raw = optiplug.unwrap_optimizer(trainer.optimizer, until=lambda o: hasattr(o, "routing"))
    return {
        "losses": {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h},
        "calls": tally.calls - calls,
        "flops": tally.flops - flops,
        "state_bytes": optiplug.tensor_bytes(raw.state),
        "optimizer": type(raw).__name__,
        "routed": len(raw.routing.muon),
        "engine": type(trainer.model_wrapped).__name__,
    }


def _same(got: dict, expected: dict, rel: float) -> float:
    """The largest relative difference of the losses of the same steps (asserted below ``rel``)."""
    assert sorted(got) == sorted(expected)
    gap = max(abs(got[step] - expected[step]) / abs(expected[step]) for step in expected)
    assert gap <= rel, (gap, got, expected)
    return gap


# ---- the tests -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("muon-deepspeed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "TORCHDYNAMO_DISABLE": "1"}  # fmt: skip
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(HERE)]
    result = subprocess.run([*command, str(root)], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return json.loads((root / "result.json").read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """1 process, batch 2B, the same data and settings: the reference (torch.optim.Muon's steps)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(tmp_path_factory.mktemp("single"), 2 * B)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_zero_stage_trains_like_one_process_within_a_bfloat16_gap_and_resumes_exactly(launched, single, stage):
    ranks = launched[f"zero{stage}"]
    for run in ranks:
        assert run["optimizer"] == "DeepSpeedMuonWithAdamW" and run["engine"] == "DeepSpeedEngine"
        assert run["routed"] == single["routed"] == 14
    losses = {int(step): loss for step, loss in ranks[0]["losses"].items()}
    assert losses[STEPS] < losses[1] - 2.0  # it learns: a gap of 2^-9 is small against what the steps change
    _same(losses, single["losses"], BF16_GAP)
    resumed = {int(step): loss for step, loss in launched[f"zero{stage}-resumed"].items() if int(step) > STEPS // 2}
    assert resumed == {step: loss for step, loss in losses.items() if step > STEPS // 2}  # exact


@pytest.mark.slow
def test_zero3_with_the_model_built_partitioned_routes_by_the_layer_shapes(launched, single):
    """``zero.Init`` makes every parameter a 1-D placeholder: the routing reads ``ds_shape``, all 14 reach Muon."""
    run = launched["zero3-init"]
    assert run["partitioned_at_build"] and run["routed"] == 14
    losses = {int(step): loss for step, loss in run["losses"].items()}
    assert losses[STEPS] < losses[1] - 2.0
    # with transformers' "auto" reduce bucket (hidden_size^2 = 1024 elements) process 0 orthogonalized every matrix
    assert run["calls"] == 14 * STEPS
    assert run["warnings"] == [
        "muon: DeepSpeed ZeRO-3 ran Newton–Schulz 14 + 0 times on the 2 processes: it shares out the Muon matrices of "
        "each reduce bucket, and zero_optimization.reduce_bucket_size holds fewer matrices than processes "
        '(transformers\' "auto" is hidden_size^2), so one process does the work of all; set it to at least 4096 '
        "(processes x the largest Muon matrix)"
    ]


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_newton_schulz_work_per_process(launched, single, stage):
    """Calls and FLOPs counted where DeepSpeed runs Newton–Schulz: ZeRO-1/2/3 share it out, stage 0 repeats it."""
    ranks = launched[f"zero{stage}"]
    assert single["calls"] == 14 * STEPS
    flops = [run["flops"] for run in ranks]
    if stage == 0:  # every process orthogonalizes every matrix (as DDP does)
        assert [run["calls"] for run in ranks] == [single["calls"]] * 2 and flops == [single["flops"]] * 2
        return
    # no matrix orthogonalized twice here (ZeRO-1/2 would repeat one that straddles two partitions) ...
    assert sum(run["calls"] for run in ranks) == single["calls"] and sum(flops) == single["flops"]
    # ... and each process does about half: ZeRO-3 round-robin, ZeRO-1/2 by partition (46% / 54% measured)
    assert all(0.4 <= share / single["flops"] <= 0.6 for share in flops), flops


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_optimizer_state_per_process(launched, single, stage):
    ranks = launched[f"zero{stage}"]
    shares = [run["state_bytes"] / single["state_bytes"] for run in ranks]
    if stage == 0:
        assert shares == [1.0, 1.0]  # the same state on each process
    else:  # partitioned: about 1/2 each (ZeRO-1/2 keep the whole momentum of a matrix their partition overlaps)
        assert all(0.4 <= share <= 0.6 for share in shares), shares


@pytest.mark.slow
def test_engagement_check_stops_a_run_whose_muon_tags_were_lost(launched):
    """DeepSpeed without ``use_muon`` tags skips Newton–Schulz and applies the raw gradient (SGD): stopped at step 1."""
    expected = sum(outcome["expected"] for outcome in launched["untagged"])
    assert expected == 14
    for outcome in launched["untagged"]:
        assert outcome["error"] == "EngagementError"
        assert outcome["message"] == (
            "muon: the first step ran Newton–Schulz 0 times (0 + 0 on 2 processes) under DeepSpeed ZeRO-2, where the "
            f"routing (14 matrices to Muon) needs {expected}: Muon is not running as configured, and the "
            "run stops rather than train something else under its name; please report it with your torch and engine "
            "versions"
        )
        assert outcome["global_step"] == 0  # the Trainer never counted the step


@pytest.mark.slow
def test_refusals_with_real_training_arguments(launched):
    assert launched["refusals"] == REFUSALS


@pytest.mark.slow
def test_compiled_newton_schulz_through_optiplug_train(tmp_path):
    """The user's path, compiler on: ``optiplug train examples/muon-deepspeed-zero3.yaml`` with 2 processes."""
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=0,
                eos_token_id=1, pad_token_id=2).save_pretrained(tmp_path / "model")  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHDYNAMO_DISABLE"):
        env.pop(name, None)
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "optiplug",
        "train", "examples/muon-deepspeed-zero3.yaml", f"model.name_or_path={tmp_path / 'model'}",
        "model.tokenizer=embedded", "model.from_scratch=true", "data.block_size=16", "data.max_blocks=64",
        "training.max_steps=4", "training.per_device_train_batch_size=2", "training.logging_steps=1",
        "training.disable_tqdm=true", "training.log_level=info", f"training.output_dir={out}",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    logs = result.stdout + result.stderr
    assert "muon: 14 matrices" in logs  # the routing read the partitioned parameters' layer shapes
    assert (
        "muon: the first step ran Newton–Schulz 14 times (7 + 7 on 2 processes) under DeepSpeed ZeRO-3 for the 14 "
        "matrices routed to Muon" in logs
    )
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)


# ---- the worker: this file run by torchrun ------------------------------------------------------


def _untagged(root: Path) -> dict:
    """A ZeRO-2 run whose parameters lose their ``use_muon`` tags after the build."""
    from optiplug_muon.engagement import EngagementError

    import optiplug

    trainer = _trainer(root / "untagged", B, deepspeed=deepspeed_config(2))
    build = trainer.create_optimizer

    def create_optimizer(model: Any = None) -> Any:
        optimizer = build(model)
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.__dict__.pop("use_muon", None)
        return optimizer

    trainer.create_optimizer = create_optimizer  # type: ignore[method-assign]
    try:
        trainer.train()
    except EngagementError as error:
        raw = optiplug.unwrap_optimizer(trainer.optimizer, until=lambda o: hasattr(o, "routing"))
        expected = sum(getattr(p, "_hp_mapping", None) is not None for p in raw._muon_params)
        return {"error": type(error).__name__, "message": str(error), "global_step": trainer.state.global_step,
                "expected": expected}  # fmt: skip
    return {"error": None}


@contextlib.contextmanager
def _warnings() -> Iterator[list[str]]:
    """The muon logger's warnings while the block runs."""
    import logging

    from optiplug_muon.engagement import logger

    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)


def _refusal(root: Path, stage: int, max_grad_norm: float, **optimizer: Any) -> str | None:
    import optiplug
    from optiplug.testing import tiny_llama, training_args

    config = deepspeed_config(stage)
    if stage == 3:
        config = json.loads((ROOT / "examples" / "deepspeed-zero3.json").read_text())  # reduce-scatter on
    args = training_args(root, deepspeed=config, max_grad_norm=max_grad_norm)
    entry = optiplug.get_entry("muon")
    try:
        entry.check(optiplug.BuildContext(model=tiny_llama(), args=args), entry.config(**optimizer))
    except optiplug.ConfigError as error:
        return str(error)
    return None


def _worker(root: Path) -> None:
    import torch.distributed as dist

    result: dict[str, Any] = {}

    def everyone(key: str, run: dict) -> None:
        ranks: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, run)
        result[key] = ranks

    for stage in STAGES:
        save = {"save_strategy": "steps", "save_steps": STEPS // 2}
        everyone(f"zero{stage}", _train(root / f"zero{stage}", B, deepspeed=deepspeed_config(stage), **save))
        checkpoint = str(root / f"zero{stage}" / f"checkpoint-{STEPS // 2}")
        resumed = _train(root / f"zero{stage}-resumed", B, resume=checkpoint, deepspeed=deepspeed_config(stage))
        result[f"zero{stage}-resumed"] = resumed["losses"]

    from transformers import AutoModelForCausalLM

    from optiplug.testing import tiny_llama, training_args

    # transformers' "auto" reduce bucket (hidden_size^2) holds one matrix: DeepSpeed shares out none of them
    auto = deepspeed_config(3)
    auto["zero_optimization"]["reduce_bucket_size"] = "auto"
    args = training_args(root / "zero3-init", deepspeed=auto)  # ZeRO-3 arguments first: zero.Init is on
    model = AutoModelForCausalLM.from_config(tiny_llama().config)
    partitioned = all(p.numel() == 0 for p in model.parameters()) and hasattr(next(model.parameters()), "ds_shape")
    del args
    with _warnings() as warnings:
        result["zero3-init"] = {**_train(root / "zero3-init", B, model=model, deepspeed=auto),
                                "partitioned_at_build": partitioned, "warnings": warnings}  # fmt: skip

    everyone("untagged", _untagged(root))
    result["refusals"] = {
        "zero3 with reduce-scatter": _refusal(root / "refusal", 3, 0.0),
        "zero2 with clipping": _refusal(root / "refusal", 2, 1.0),
        "zero1 with spectral": _refusal(root / "refusal", 1, 0.0, adjust_lr="spectral"),
    }
    if dist.get_rank() == 0:
        (root / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _worker(Path(sys.argv[1]))
    from optiplug.process_group import exit_process

    exit_process(0)  # not the interpreter's teardown, which can abort beside gloo's threads
