"""Sharded training acceptance: FSDP2 and DeepSpeed ZeRO with N processes side by side with one process.

Made for a machine with GPUs (one process per GPU, NCCL); the same logic runs on CPU (gloo) with
``--device cpu``, which is how it is tested and how the CPU figures in docs/benchmarks.md were measured::

    python benchmarks/gpu_acceptance.py                          # 2 GPUs: the 100M model (no GPUs: as --device cpu)
    python benchmarks/gpu_acceptance.py --device cpu             # 2 processes on CPU, the tiny model (~8 minutes)
    python benchmarks/gpu_acceptance.py --nproc 4 --size 27M --optimizers muon,adam_mini --trainer

For each optimizer, every process (of ``--nproc``, started by torchrun) trains a ``fully_shard``-ed
Llama (one shard unit per decoder layer) built through ``optiplug.build_optimizer``, saves a
``torch.distributed.checkpoint`` half-way, then trains an unsharded copy on the whole global batch
(the "one process" run), then resumes a fresh sharded model from the checkpoint. Measured and printed
side by side, then asserted:

- ``loss_gap``: the largest relative difference of the per-step losses, sharded vs one process
  (float32, TF32 off on GPUs, Muon's Newton–Schulz in float32): at most ``--rtol``;
- ``weights_gap``: the largest absolute difference of the final weights (reported);
- ``resume``: the resumed run's losses equal the uninterrupted run's (bit for bit on CPU, within 1e-6 on GPUs);
- ``state_share``: each process's optimizer state over one process's, at most 0.55 with 2 processes
  (``1.1 / N``), and ``estimate_share``: ``optiplug estimate --nproc N --engine fsdp``'s figure over it;
- ``work``: for an ``optiplug.MatrixOptimizer``, the matrices each process updated (they add up to the
  matrices, each process does some), and for Muon the share of Newton–Schulz FLOPs per process;
- ``peak_mib``: on GPUs, ``torch.cuda.max_memory_allocated`` of the sharded run and of the one-process run.

``--deepspeed`` (default when deepspeed is installed) trains muon (DeepSpeed's own Muon, bfloat16 Newton–Schulz:
gap at most 2^-9), adamw and the three schedule-free optimizers under each ZeRO stage they allow, through the
Trainer with ``--nproc`` processes, against one process with the whole batch (the same Trainer, no DeepSpeed):
loss gap, exact resume from the half-way checkpoint, state per process (about 1/N at ZeRO-1/2/3) and Newton–Schulz
FLOPs per process (ZeRO-0 repeats them on every process).

``--families`` (default: one optimizer per family: adamw, muon, galore_adamw, apollo_adamw, adam_mini,
schedule_free_adamw, badam, bnb_adamw 8-bit, torchao_adamw8bit) trains each in one process through the Trainer in
bfloat16 autocast (on GPUs also adamw in fp16 with a gradient scaler): the loss falls, resume from the half-way
checkpoint is exact, the optimizer state equals ``optiplug estimate``'s within 10%, and on GPUs
``torch.cuda.max_memory_allocated`` is reported against AdamW's.

``--trainer`` (default on GPUs) also trains each optimizer for a few steps with ``optiplug train`` under
torchrun and ``training.fsdp`` (accelerate's FSDP2 on GPUs; on CPU accelerate runs it as DDP) and asserts it
finishes. Exit status 0 only when every assertion holds; the figures go to ``--results`` (default
``benchmarks/results/gpu_acceptance.json``, read by ``run_all.py``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import _common

OPTIMIZERS: dict[str, dict[str, Any]] = {
    "adamw": {"name": "adamw", "lr": 1e-3},
    "muon": {"name": "muon", "ns_dtype": "float32"},
    "galore_adamw": {"name": "galore_adamw", "rank": 8, "update_proj_gap": 2, "lr": 3e-3},
    "apollo_adamw": {"name": "apollo_adamw", "rank": 8, "update_proj_gap": 2},
    "apollo_mini": {"name": "apollo_mini", "update_proj_gap": 2},
    "adam_mini": {"name": "adam_mini", "lr": 3e-3},
    "schedule_free_adamw": {"name": "schedule_free_adamw", "lr": 1e-2, "warmup_steps": 2},
    "schedule_free_radam": {"name": "schedule_free_radam", "lr": 1e-2},
    "schedule_free_sgd": {"name": "schedule_free_sgd", "lr": 1e-2, "warmup_steps": 2},
}
"""The sharded optimizers of issue 20, with AdamW as the baseline (settings that refresh projections in the run)."""

ZERO_STAGES: dict[str, tuple[int, ...]] = {"muon": (0, 1, 2, 3), "adamw": (1, 2, 3), "schedule_free_adamw": (1, 2, 3),
                                           "schedule_free_radam": (1, 2, 3), "schedule_free_sgd": (1, 2, 3)}  # fmt: skip
"""What trains under DeepSpeed (``--deepspeed``), through the Trainer: Muon as DeepSpeed's own Muon, schedule-free
with its switch carried into DeepSpeed's partitions, AdamW as the baseline. The stages each is allowed at (fp32)."""
ZERO_GAP = {"muon": 2**-9}
"""Loss gap allowed under DeepSpeed where it differs by design: DeepSpeed's Muon runs Newton–Schulz in bfloat16."""


# ---- every process of the launch ------------------------------------------------------------------------


def _batches(steps: int, rows: int, seq: int, vocab: int) -> list[Any]:
    """The global batches: ``rows`` sequences each, drawn from 8 fixed blocks (learnable: the loss falls)."""
    import torch

    blocks = _common.TokenDataset(8, seq_len=seq, vocab=vocab).ids
    generator = torch.Generator().manual_seed(1)
    return [blocks[torch.randint(0, 8, (rows,), generator=generator)] for _ in range(steps)]


def _peak(device: str) -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated()) if device == "cuda" else None


def _reset_peak(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _estimate(size: str, cfg: Any, processes: int) -> int | None:
    """``optiplug estimate --nproc N --engine fsdp``'s per-process optimizer state for ``cfg`` on this model."""
    import torch

    from optiplug.app.estimate import ModelShapes, estimate_shapes

    with torch.device("meta"):
        model = _common.build_model(size)
    [row] = estimate_shapes(ModelShapes.of_model(model), [cfg], model, 1, processes, "fsdp")
    return row.state_bytes


def side_by_side(cfg: dict[str, Any], args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """One optimizer: sharded, one process, resumed; this process's measurements."""
    import torch.distributed as dist

    import optiplug
    from optiplug.testing_launch import fully_sharded, load_checkpoint, save_checkpoint, train_steps

    rank, world, device = dist.get_rank(), dist.get_world_size(), args.device
    vocab = _common.MODEL_SIZES[args.size].vocab
    batches = _batches(args.steps, world * args.batch, args.seq, vocab)
    mine, half = slice(rank * args.batch, (rank + 1) * args.batch), args.steps // 2
    try:
        from optiplug_muon.engagement import tally
    except ImportError:
        tally = None
    work_before = (tally.calls, tally.flops) if tally is not None else (0, 0)

    _reset_peak(device)
    model = fully_sharded(_common.build_model(args.size, seed=0).to(device))
    optimizer = optiplug.build_optimizer(model, cfg)
    sharded = train_steps(model, optimizer, batches[:half], mine, device)
    checkpoint = root / f"{cfg['name']}-checkpoint"
    save_checkpoint(model, optimizer, checkpoint)
    sharded += train_steps(model, optimizer, batches[half:], mine, device)
    result: dict[str, Any] = {
        "state_sharded": optiplug.optimizer_state_bytes(optimizer),
        "peak_sharded": _peak(device),
        "matrices": getattr(optimizer, "last_step_matrices", None),
        "updates": getattr(optimizer, "last_step_matrix_updates", None),
        "ns_calls": tally.calls - work_before[0] if tally is not None else 0,
        "ns_flops": tally.flops - work_before[1] if tally is not None else 0,
        "class": type(optimizer).__name__,
    }
    final = [p.full_tensor().cpu() for p in model.parameters()]
    del model, optimizer

    _reset_peak(device)
    single_model = _common.build_model(args.size, seed=0).to(device)
    single_optimizer = optiplug.build_optimizer(single_model, cfg)
    single = train_steps(single_model, single_optimizer, batches, None, device)
    result["state_single"] = optiplug.optimizer_state_bytes(single_optimizer)
    result["peak_single"] = _peak(device)
    result["weights_gap"] = max((p - q.cpu()).abs().max().item() for p, q in zip(final, single_model.parameters()))
    del single_model, single_optimizer, final

    resumed_model = fully_sharded(_common.build_model(args.size, seed=1).to(device))  # all from the checkpoint
    resumed_optimizer = optiplug.build_optimizer(resumed_model, cfg)
    load_checkpoint(resumed_model, resumed_optimizer, checkpoint)
    resumed = train_steps(resumed_model, resumed_optimizer, batches[half:], mine, device)
    del resumed_model, resumed_optimizer
    result["estimate"] = _estimate(args.size, optiplug.parse_optimizer(cfg), world) if rank == 0 else None
    result["losses"] = {"sharded": sharded, "single": single, "resumed": resumed}
    return result


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    root = Path(args.worker)
    results = {}
    for name in args.optimizers:
        dist.barrier()
        try:
            results[name] = side_by_side(OPTIMIZERS.get(name, {"name": name}), args, root)
        except Exception as error:  # reported in the table; the other optimizers still run
            results[name] = {"error": f"{type(error).__name__}: {error}"}
        (root / f"rank-{dist.get_rank()}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


# ---- DeepSpeed ZeRO through the Trainer (a launch of its own) ---------------------------------------------


def zero_config(stage: int) -> dict[str, Any]:
    """examples/muon-deepspeed-zero3.json at ``stage`` (without reduce-scatter, which DeepSpeed's Muon needs at 3)."""
    config = json.loads((_common.HERE.parent / "examples" / "muon-deepspeed-zero3.json").read_text())
    config["zero_optimization"] = config["zero_optimization"] if stage == 3 else {"stage": stage}
    return config


def zero_trainer(
    name: str,
    out: Path,
    batch: int,
    args: argparse.Namespace,
    optimizer: dict[str, Any] | None = None,
    **arguments: Any,
) -> Any:
    import optiplug

    vocab = _common.MODEL_SIZES[args.size].vocab
    data = _common.TokenDataset(8, seq_len=args.seq, vocab=vocab)
    data.ids = data.ids.repeat(args.steps * args.nproc * args.batch // 8 + 1, 1)  # the 8 blocks again and again
    training = _common.training_args(out, max_steps=args.steps, per_device_train_batch_size=batch, logging_steps=1,
                                     logging_strategy="steps", max_grad_norm=0.0, use_cpu=args.device == "cpu",
                                     **arguments)  # fmt: skip
    scheduler = "constant" if name.startswith("schedule_free") else None
    if optimizer is None:  # under DeepSpeed: muon at its defaults (DeepSpeed's Muon runs Newton–Schulz in bfloat16)
        optimizer = {"name": name} if name == "muon" else OPTIMIZERS.get(name, {"name": name})
    return optiplug.OptiTrainer(model=_common.build_model(args.size), args=training, train_dataset=data,
                                optimizer=optimizer, scheduler=scheduler)  # fmt: skip


def zero_run(name: str, out: Path, batch: int, args: argparse.Namespace, **arguments: Any) -> dict[str, Any]:
    """Train, then resume from the half-way checkpoint: losses, this process's state bytes and Newton–Schulz FLOPs."""
    import optiplug
    from optiplug.testing import logged_losses

    try:
        from optiplug_muon.engagement import tally
    except ImportError:
        tally = None
    flops = tally.flops if tally is not None else 0
    half = args.steps // 2
    run = zero_trainer(name, out, batch, args, save_strategy="steps", save_steps=half, **arguments)
    run.train()
    client: Any = run.optimizer
    while type(client).__module__.split(".")[0] in ("accelerate", "deepspeed") and hasattr(client, "optimizer"):
        client = client.optimizer  # the optimizer DeepSpeed steps its partitions with
    result = {
        "losses": logged_losses(run),
        "state": optiplug.tensor_bytes(client.state),
        "ns_flops": (tally.flops - flops) if tally is not None else 0,
    }
    del run
    resumed = zero_trainer(name, out.parent / f"{out.name}-resumed", batch, args, **arguments)
    resumed.train(resume_from_checkpoint=str(out / f"checkpoint-{half}"))
    result["resumed"] = {step: loss for step, loss in logged_losses(resumed).items() if step > half}
    return result


def zero_worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    args.nproc = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    root, results = Path(args.zero_worker), {}
    for name in args.optimizers:
        for stage in ZERO_STAGES.get(name, ()):
            key = f"{name}@zero{stage}"
            try:
                results[key] = zero_run(name, root / key, args.batch, args, deepspeed=zero_config(stage))
            except Exception as error:  # reported in the table; the others still run
                results[key] = {"error": f"{type(error).__name__}: {error}"}
            (root / f"zero-rank-{dist.get_rank()}.json").write_text(json.dumps(results))


def zero_rows(args: argparse.Namespace, root: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Every (optimizer, stage) of ZERO_STAGES under DeepSpeed with ``--nproc`` processes, against one process."""
    import torch

    names = [name for name in args.optimizers if name in ZERO_STAGES]
    if not names:
        return [], []
    command = [*_torchrun(args.nproc), str(Path(__file__).resolve()), "--zero-worker", str(root), "--device",
               args.device, "--size", args.size, "--steps", str(args.steps), "--batch", str(args.batch), "--seq",
               str(args.seq), "--optimizers", ",".join(names)]  # fmt: skip
    env = _environment()
    if args.device == "cpu":
        env["TORCHDYNAMO_DISABLE"] = "1"  # DeepSpeed compiles its Newton–Schulz: once per process, minutes on CPU
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    files = [root / f"zero-rank-{rank}.json" for rank in range(args.nproc)]
    if done.returncode != 0 or not all(path.exists() for path in files):
        raise SystemExit(f"the DeepSpeed launch failed (exit {done.returncode}):\n{done.stderr[-6000:]}")
    per_rank = [json.loads(path.read_text()) for path in files]
    rows, failed = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for name in names:
        single = zero_run(name, root / f"{name}-one-process", args.nproc * args.batch, args)
        for stage in ZERO_STAGES[name]:
            got = [ranks[f"{name}@zero{stage}"] for ranks in per_rank]
            if any("error" in g for g in got):
                error = next(g["error"] for g in got if "error" in g)
                rows.append({"optimizer": name, "engine": f"ZeRO-{stage}", "error": error})
                failed.append(f"{name} ZeRO-{stage}: {error}")
                continue
            losses, reference = got[0]["losses"], {str(k): v for k, v in single["losses"].items()}
            gap = max(abs(losses[k] - reference[k]) / abs(reference[k]) for k in reference)
            tail = {k: losses[k] for k in got[0]["resumed"]}
            flops = [g["ns_flops"] for g in got]
            shares = [g["state"] / single["state"] for g in got]
            row = {"optimizer": name, "engine": f"ZeRO-{stage}", "device": f"{args.device} x{args.nproc}",
                   "model": args.size, "steps": args.steps, "loss_gap": gap, "resume_exact": got[0]["resumed"] == tail,
                   "state_bytes_per_rank": "/".join(str(g["state"]) for g in got), "state_bytes_single": single["state"],
                   "state_share_max": max(shares),
                   "ns_flops_share": "/".join(f"{f / single['ns_flops']:.2f}" for f in flops) if sum(flops) else None}  # fmt: skip
            rows.append(row)
            allowed = ZERO_GAP.get(name, args.rtol)
            if gap > allowed:
                failed.append(f"{name} ZeRO-{stage}: loss gap {gap:.2e} above {allowed:g}")
            if not row["resume_exact"]:
                failed.append(f"{name} ZeRO-{stage}: the resumed run's losses differ")
            if stage >= 1 and max(shares) > 1.2 / args.nproc:
                failed.append(f"{name} ZeRO-{stage}: a process holds {max(shares):.2f} of one process's state")
    torch.set_num_threads(threads)
    return rows, failed


# ---- every optimizer family on one device: mixed precision, resume, memory against AdamW and the estimate -------

FAMILIES: dict[str, dict[str, Any]] = {
    **{name: OPTIMIZERS[name] for name in ("adamw", "muon", "galore_adamw", "apollo_adamw", "adam_mini")},
    "schedule_free_adamw": OPTIMIZERS["schedule_free_adamw"],
    "badam": {"name": "badam", "switch_every": 2},
    "bnb_adamw": {"name": "bnb_adamw", "bits": 8},
    "torchao_adamw8bit": {"name": "torchao_adamw8bit"},
}
"""One optimizer of each family (``--families``): trained in one process in bfloat16 autocast."""


def family_run(name: str, out: Path, args: argparse.Namespace, precision: str) -> dict[str, Any]:
    """Train in one process with ``precision`` (bf16 autocast, or fp16 with a gradient scaler), then resume from the
    half-way checkpoint: the losses, the optimizer state and the peak memory of the first run."""
    import optiplug
    from optiplug.testing import logged_losses

    half = args.steps // 2
    _reset_peak(args.device)
    run = zero_trainer(name, out, args.batch, args, FAMILIES[name], save_strategy="steps", save_steps=half,
                       **{precision: True})  # fmt: skip
    run.train()
    raw = optiplug.unwrap_optimizer(run.optimizer, until=lambda o: not type(o).__module__.startswith("accelerate"))
    result = {"losses": logged_losses(run), "state": optiplug.optimizer_state_bytes(raw), "peak": _peak(args.device)}
    del run, raw
    resumed = zero_trainer(
        name, out.parent / f"{out.name}-resumed", args.batch, args, FAMILIES[name], **{precision: True}
    )
    resumed.train(resume_from_checkpoint=str(out / f"checkpoint-{half}"))
    result["resumed"] = {step: loss for step, loss in logged_losses(resumed).items() if step > half}
    return result


def family_rows(args: argparse.Namespace, root: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Each family in bfloat16 autocast (and AdamW in fp16 with a gradient scaler on GPUs), in this process."""
    import torch

    import optiplug
    from optiplug.app.estimate import ModelShapes, estimate_shapes

    with torch.device("meta"):
        meta = _common.build_model(args.size)
    cases = [(name, "bf16") for name in FAMILIES if name in args.families]
    if args.device == "cuda":
        cases.append(("adamw", "fp16"))
    rows, failed, adamw_peak = [], [], None
    for name, precision in cases:
        try:
            got = family_run(name, root / f"family-{name}-{precision}", args, precision)
        except Exception as error:  # reported in the table; the other families still run
            rows.append({"optimizer": name, "engine": f"one process, {precision}", "error": f"{type(error).__name__}: "
                         f"{error}"})  # fmt: skip
            failed.append(f"{name} ({precision}): {type(error).__name__}: {error}")
            continue
        [estimate] = estimate_shapes(ModelShapes.of_model(meta), [optiplug.parse_optimizer(FAMILIES[name])], meta)
        losses = got["losses"]
        tail = {step: losses[step] for step in got["resumed"]}
        if name == "adamw" and precision == "bf16":
            adamw_peak = got["peak"]
        row = {"optimizer": name, "engine": f"one process, {precision}", "device": f"{args.device} x1",
               "model": args.size, "steps": args.steps, "first_loss": losses[min(losses)], "last_loss": losses[max(losses)],
               "resume_exact": got["resumed"] == tail, "state_bytes_single": got["state"],
               "estimate_share": estimate.state_bytes / got["state"] if estimate.state_bytes and got["state"] else None,
               "peak_mib_single": _common.mib(got["peak"]),
               "peak_vs_adamw": got["peak"] / adamw_peak if got["peak"] and adamw_peak else None}  # fmt: skip
        rows.append(row)
        if not all(math.isfinite(loss) for loss in losses.values()) or losses[max(losses)] >= losses[min(losses)]:
            failed.append(f"{name} ({precision}): the loss did not fall ({losses})")
        if not row["resume_exact"]:
            failed.append(f"{name} ({precision}): the resumed run's losses differ ({got['resumed']} vs {tail})")
        if row["estimate_share"] is not None and abs(row["estimate_share"] - 1) > 0.1:
            failed.append(f"{name}: optiplug estimate says {row['estimate_share']:.2f}x the measured state")
    return rows, failed


# ---- the parent: launch, then compare ------------------------------------------------------------------


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


def _environment() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def launch(args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    """Run the workers; every process's results (raises with the launch's output when it failed)."""
    command = [*_torchrun(args.nproc), str(Path(__file__).resolve()), "--worker", str(root), "--device", args.device,
               "--size", args.size, "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq),
               "--optimizers", ",".join(args.optimizers)]  # fmt: skip
    done = subprocess.run(command, env=_environment(), capture_output=True, text=True, timeout=args.timeout)
    files = [root / f"rank-{rank}.json" for rank in range(args.nproc)]
    if done.returncode != 0 or not all(path.exists() for path in files):
        raise SystemExit(f"the launch failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return [json.loads(path.read_text()) for path in files]


def row_of(name: str, per_rank: list[dict[str, Any]], args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """The figures of one optimizer, and what failed."""
    errors = [got["error"] for got in per_rank if "error" in got]
    if errors:
        return {"optimizer": name, "device": args.device, "error": errors[0]}, [f"{name}: {errors[0]}"]
    first, n = per_rank[0], len(per_rank)
    losses = first["losses"]
    gap = max(abs(a - b) / abs(b) for a, b in zip(losses["sharded"], losses["single"]))
    resumed, tail = losses["resumed"], losses["sharded"][len(losses["sharded"]) - len(losses["resumed"]) :]
    resume_gap = max(abs(a - b) / abs(b) for a, b in zip(resumed, tail))
    shares = [got["state_sharded"] / got["state_single"] for got in per_rank]
    row: dict[str, Any] = {
        "optimizer": name,
        "engine": "FSDP2",
        "device": f"{args.device} x{n}",
        "model": args.size,
        "steps": args.steps,
        "loss_gap": gap,
        "weights_gap": first["weights_gap"],
        "resume_exact": resumed == tail,
        "state_bytes_per_rank": "/".join(str(got["state_sharded"]) for got in per_rank),
        "state_bytes_single": first["state_single"],
        "state_share_max": max(shares),
        "estimate_share": first["estimate"] / first["state_sharded"] if first["estimate"] else None,
        "updates_per_rank": "/".join(str(got["updates"]) for got in per_rank) if first["matrices"] else None,
        "matrices": first["matrices"],
        "ns_flops_share": None,
        "peak_mib_sharded": _common.mib(max(got["peak_sharded"] or 0 for got in per_rank)) or None,
        "peak_mib_single": _common.mib(first["peak_single"]),
    }
    flops = [got["ns_flops"] for got in per_rank]
    if sum(flops):
        row["ns_flops_share"] = "/".join(f"{f / sum(flops):.2f}" for f in flops)
    failed = []
    if gap > args.rtol:
        failed.append(f"{name}: loss gap {gap:.2e} above {args.rtol:g}")
    if resume_gap > (0.0 if args.device == "cpu" else 1e-6):
        failed.append(f"{name}: the resumed run's losses differ by {resume_gap:.2e}")
    if max(shares) > 1.1 / n:
        failed.append(f"{name}: a process holds {max(shares):.2f} of one process's state (expected about 1/{n})")
    estimate = row["estimate_share"]
    if estimate is not None and abs(estimate - 1) > 0.1:
        failed.append(f"{name}: optiplug estimate says {estimate:.2f}x the measured per-process state")
    if first["matrices"]:
        updates = [got["updates"] for got in per_rank]
        if sum(updates) != first["matrices"] or min(updates) == 0:
            failed.append(f"{name}: matrix updates per process {updates} of {first['matrices']}")
    if sum(flops) and max(flops) / sum(flops) > 1.5 / n:
        failed.append(f"{name}: one process ran {max(flops) / sum(flops):.0%} of the Newton–Schulz FLOPs")
    return row, failed


def trainer_runs(args: argparse.Namespace, root: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """``optiplug train`` under torchrun with ``training.fsdp`` for each optimizer: it must finish."""
    rows, failed = [], []
    for name in args.optimizers:
        out = root / f"train-{name}"
        command = [*_torchrun(args.nproc), "-m", "optiplug", "train", "--quiet", f"optimizer.name={name}",
                   "training.max_steps=6", "training.logging_steps=1", "training.fsdp=full_shard", "training.fsdp_config.version=2",
                   "training.max_grad_norm=0", f"training.use_cpu={args.device == 'cpu'}",
                   f"training.output_dir={out}"]  # fmt: skip
        if name.startswith("schedule_free"):
            command.append("scheduler.name=constant")
        done = subprocess.run(command, env=_environment(), capture_output=True, text=True, timeout=args.timeout)
        summary = out / "summary.json"
        final = json.loads(summary.read_text()).get("final_loss") if summary.exists() else None
        rows.append({"optimizer": name, "device": f"{args.device} x{args.nproc}", "optiplug_train": done.returncode,
                     "final_loss": final})  # fmt: skip
        if done.returncode != 0 or final is None or not math.isfinite(final):
            failed.append(f"optiplug train {name}: exit {done.returncode}: {done.stderr.strip()[-400:]}")
    return rows, failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: cuda with --nproc GPUs, else cpu (gloo) with a note")  # fmt: skip
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--size", choices=sorted(_common.MODEL_SIZES), default=None, help="default: 100M, tiny on cpu")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2, help="sequences per process and step")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: 128, 32 on cpu)")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--rtol", type=float, default=None, help="loss gap allowed (default: 1e-5 cpu, 1e-4 cuda)")
    parser.add_argument("--trainer", action=argparse.BooleanOptionalAction, default=None,
                        help="also run optiplug train with training.fsdp (default: on cuda only)")  # fmt: skip
    parser.add_argument("--deepspeed", action=argparse.BooleanOptionalAction, default=None,
                        help="also train muon, schedule_free_adamw and adamw under DeepSpeed ZeRO through the Trainer "
                        "(default: when deepspeed is installed)")  # fmt: skip
    parser.add_argument("--families", default=",".join(FAMILIES),
                        help="optimizer families trained in one process in bfloat16 autocast (and adamw in fp16 with "
                        "a gradient scaler on GPUs): resume, state against optiplug estimate, peak memory against "
                        "adamw; empty: none")  # fmt: skip
    parser.add_argument("--results", default=str(_common.RESULTS_DIR / "gpu_acceptance.json"))
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--zero-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "auto":
        import torch

        enough = torch.cuda.is_available() and torch.cuda.device_count() >= args.nproc
        args.device = "cuda" if enough else "cpu"
        if not enough and not (args.worker or args.zero_worker):
            print(f"gpu_acceptance: fewer than {args.nproc} CUDA devices here: CPU figures (gloo, --device cpu)")
    cpu = args.device == "cpu"
    args.size = args.size or ("tiny" if cpu else "100M")
    args.seq = args.seq or (32 if cpu else 128)
    args.rtol = args.rtol if args.rtol is not None else (1e-5 if cpu else 1e-4)
    args.optimizers = [name.strip() for name in args.optimizers.split(",") if name.strip()]
    args.families = [name.strip() for name in args.families.split(",") if name.strip()]
    if args.worker:
        worker(args)
        return 0
    if args.zero_worker:
        zero_worker(args)
        return 0
    if not cpu:
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() < args.nproc:
            print(f"gpu_acceptance: needs {args.nproc} CUDA devices; run with --device cpu on a machine without them")
            return 2
    with tempfile.TemporaryDirectory(prefix="gpu-acceptance-") as folder:
        root = Path(folder)
        per_rank = launch(args, root)
        rows, failed = [], []
        for name in args.optimizers:
            row, problems = row_of(name, [got[name] for got in per_rank], args)
            rows.append(row)
            failed += problems
        zero: list[dict[str, Any]] = []
        if args.deepspeed if args.deepspeed is not None else importlib.util.find_spec("deepspeed") is not None:
            zero, problems = zero_rows(args, root)
            failed += problems
        families: list[dict[str, Any]] = []
        if args.families:
            families, problems = family_rows(args, root)
            failed += problems
        trained: list[dict[str, Any]] = []
        if args.trainer if args.trainer is not None else not cpu:
            trained, problems = trainer_runs(args, root)
            failed += problems
    print(_table(rows))
    if zero:
        print(_table(zero))
    if families:
        print(_table(families))
    if trained:
        print(_table(trained))
    notes = (f"{args.nproc} processes ({'gloo, CPU' if cpu else 'NCCL, one GPU each'}), model {args.size}, "
             f"{args.steps} steps of {args.nproc} x {args.batch} sequences of {args.seq} tokens, float32; "
             f"command: python benchmarks/gpu_acceptance.py --device {args.device}. "
             + ("CPU figures: no GPU was used." if cpu else "GPU figures."))  # fmt: skip
    title = (f"Sharded acceptance: FSDP2 and DeepSpeed ZeRO ({args.nproc} processes) vs one process, per optimizer "
             f"({args.device})")  # fmt: skip
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"title": title, "rows": rows + zero + families + trained, "notes": notes}, indent=2) + "\n"
    )
    for line in failed:
        print(f"FAILED {line}")
    print("all assertions hold" if not failed else f"{len(failed)} assertion(s) failed")
    return 1 if failed else 0


def _table(rows: list[dict[str, Any]]) -> str:
    import run_all

    return run_all.markdown_table(rows)


if __name__ == "__main__":
    raise SystemExit(main())
