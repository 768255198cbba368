"""Data parallelism on this machine: 2 DDP processes (torchrun, gloo) vs 1 process, ``adamw``, same global batch.

Three set-ups train the same model (same seed, same data, same global batch of GLOBAL_BATCH
blocks of SEQ tokens per step) with OptiTrainer and ``adamw``:

* ``1 process, 1 thread``   — the baseline with one core's worth of compute;
* ``1 process, 2 threads``  — one process using both cores through torch's intra-op threads;
* ``2 processes (DDP)``     — ``torchrun --nproc_per_node 2``, one thread each, GLOBAL_BATCH / 2 per process,
  gradients averaged over gloo.

Each set-up runs in fresh processes, alternating A B C, C B A so that load drifts hit all alike.
Reported per model size: steps/s of the training loop (1 / the median time between step ends,
set-up and the first steps excluded), samples/s (steps/s x global batch), the ratio of DDP to
each single-process set-up, and parity: the largest relative difference between the per-step
losses of DDP and of one process (the same global batch; only the order of the gradient sum
differs). On 2 cores, DDP can at best match one process that already uses both cores.

Run: python benchmarks/ddp_throughput.py        (about 3 minutes)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common

SIZES = {"tiny": {"steps": 30, "warmup": 5}, "27M": {"steps": 5, "warmup": 1}}
GLOBAL_BATCH = 8
SEQ = 64
REPETITIONS = 2
SETUPS = {
    "1 process, 1 thread": {"processes": 1, "threads": 1},
    "1 process, 2 threads": {"processes": 1, "threads": 2},
    "2 processes (DDP)": {"processes": 2, "threads": 1},
}


# ---- the measured run (a child process, or each torchrun worker) ------------------------------


def worker(out: Path) -> None:
    import torch
    from transformers import TrainerCallback

    import optiplug

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    results = {}
    for size, plan in SIZES.items():
        model = _common.build_model(size, seed=0)
        data = _common.TokenDataset(512, seq_len=SEQ, vocab=_common.MODEL_SIZES[size].vocab, seed=0)
        args = _common.training_args(
            Path(out).parent / f"run-{size}", max_steps=plan["steps"], per_device_train_batch_size=GLOBAL_BATCH // world,
            logging_strategy="steps", logging_steps=1, ddp_find_unused_parameters=False,
        )  # fmt: skip
        timer = StepTimer()
        trainer = optiplug.OptiTrainer(
            model=model, args=args, train_dataset=data, optimizer={"name": "adamw", "lr": 1e-3}
        )
        trainer.add_callback(timer)
        trainer.train()
        gaps = [b - a for a, b in zip(timer.ends[plan["warmup"] :], timer.ends[plan["warmup"] + 1 :])]
        results[size] = {
            "step_seconds": statistics.median(gaps),
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "world_size": trainer.args.world_size,
        }
    if int(os.environ.get("RANK", "0")) == 0:
        out.write_text(json.dumps(results))


# ---- the driver ------------------------------------------------------------------------------


def measure(setup: dict[str, int], workdir: Path) -> dict:
    out = workdir / "result.json"
    out.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(setup["threads"]), "BENCH_THREADS": str(setup["threads"]),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(_common.HERE), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    launcher = [sys.executable]
    if setup["processes"] > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(setup["processes"])]
    done = subprocess.run([*launcher, __file__, "--worker", str(out)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"run failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


def main() -> None:
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        runs = _common.interleaved(
            {name: (lambda s=setup: measure(s, Path(tmp))) for name, setup in SETUPS.items()}, REPETITIONS
        )
    rows = []
    for size in SIZES:
        steps_per_s = {name: 1.0 / _common.median([r[size]["step_seconds"] for r in runs[name]]) for name in SETUPS}
        ddp = runs["2 processes (DDP)"][0][size]
        single = runs["1 process, 1 thread"][0][size]
        assert ddp["world_size"] == 2 and single["world_size"] == 1
        parity = max(abs(a - b) / abs(b) for a, b in zip(ddp["losses"], single["losses"]))
        for name in SETUPS:
            rows.append({
                "model": size,
                "setup": name,
                "steps_per_s": round(steps_per_s[name], 3),
                "samples_per_s": round(steps_per_s[name] * GLOBAL_BATCH, 2),
                "ddp_speedup_vs_this": round(steps_per_s["2 processes (DDP)"] / steps_per_s[name], 3),
                "loss_max_rel_diff_vs_1_process": parity if name == "2 processes (DDP)" else None,
            })  # fmt: skip
    for row in rows:
        print(f"{row['model']:>5}  {row['setup']:<22} {row['steps_per_s']:>8.3f} steps/s {row['samples_per_s']:>8.2f} "
              f"samples/s   DDP / this = {row['ddp_speedup_vs_this']:.3f}"
              + (f"   loss parity (max rel diff) {row['loss_max_rel_diff_vs_1_process']:.2e}"
                 if row["loss_max_rel_diff_vs_1_process"] is not None else ""))  # fmt: skip
    notes = (
        f"Global batch {GLOBAL_BATCH} x {SEQ} tokens per step in every set-up (DDP: {GLOBAL_BATCH // 2} per process). "
        f"Models: " + "; ".join(f"{s}: {_common.MODEL_SIZES[s].describe()}" for s in SIZES) + ". "
        f"Steps/s = 1 / median time between step ends after warm-up, median over {REPETITIONS} interleaved runs "
        f"of each set-up, each in fresh processes. Loss parity compares DDP's per-step losses with one process "
        f"(same seed, data and global batch). {os.cpu_count()} CPUs; 1-minute load average {load_before:.1f} "
        f"before and {os.getloadavg()[0]:.1f} after: on a shared machine other work takes CPU time unevenly, so "
        f"steps/s and even the ratios vary from run to run; parity does not. Took {time.perf_counter() - started:.0f} s."
    )
    path = _common.write_results(
        _common.script_name(__file__), "2-process DDP (torchrun, gloo) vs 1 process on CPU: adamw",
        rows, notes, machine={**_common.machine(), "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]},
        chart={"x": ["model", "setup"], "y": ["samples_per_s"], "kind": "bar", "logy": True, "ylabel": "samples/s"},
    )  # fmt: skip
    print(notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        from optiplug.process_group import exit_process

        worker(Path(sys.argv[2]))
        exit_process(0)  # not the interpreter's teardown, which can abort beside gloo's threads
    else:
        main()
