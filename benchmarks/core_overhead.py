"""The core's cost per training step: OptiTrainer with ``adamw`` vs a plain transformers.Trainer.

Both train the same model (``tiny`` size, same seed) on the same data with the same AdamW
(torch's fused kernel, lr 1e-3, no weight decay) and the same linear schedule, alternating
A B B A ... over several repetitions so that load drifts on the machine hit both alike.

Reported: steps/s of the training loop as 1 / the median time between consecutive step ends
(set-up excluded; a median shrugs off the moments when other work takes the CPU), the ratio
OptiTrainer / Trainer as the median of the ratios of runs made back to back (target >= 0.99),
the median whole ``train()`` wall time ratio (set-up included), and whether both produced the
same losses (they must: the settings are the same). torch runs on one thread, which keeps a
shared machine's load from multiplying into thread contention.
"""

from __future__ import annotations

import tempfile
import time

import _common

SIZE = "tiny"
STEPS = 50
REPETITIONS = 8
BATCH = 8
SEQ = 64
LR = 1e-3


def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    return StepTimer()


def run(kind: str, data, output_dir: str) -> dict:
    """One training run; returns loop steps/s, train() seconds and the final loss."""
    from transformers import Trainer

    import optiplug

    model = _common.build_model(SIZE, seed=0)
    args = _common.training_args(
        output_dir, max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=LR,
        optim="adamw_torch_fused", lr_scheduler_type="linear", logging_steps=STEPS, logging_strategy="steps",
    )  # fmt: skip
    timer = _step_timer()
    if kind == "OptiTrainer":
        trainer = optiplug.OptiTrainer(
            model=model, args=args, train_dataset=data, optimizer={"name": "adamw", "lr": LR}
        )
    else:
        trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.add_callback(timer)
    start = time.perf_counter()
    output = trainer.train()
    total = time.perf_counter() - start
    step_times = [b - a for a, b in zip(timer.ends, timer.ends[1:])]
    return {"step_times": step_times, "train_s": total, "loss": output.training_loss}


def main() -> None:
    import torch

    torch.set_num_threads(1)
    data = _common.TokenDataset(n=STEPS * BATCH, seq_len=SEQ, vocab=_common.MODEL_SIZES[SIZE].vocab)
    results: dict[str, list[dict]] = {"Trainer": [], "OptiTrainer": []}
    with tempfile.TemporaryDirectory() as tmp:
        run("OptiTrainer", data, tmp)  # warm-up: imports, kernels, allocator
        run("Trainer", data, tmp)
        for kind, values in _common.interleaved(
            {kind: (lambda kind=kind: run(kind, data, tmp)) for kind in results}, REPETITIONS
        ).items():
            results[kind] = values

    def steps_per_s(kind: str) -> float:
        return 1.0 / _common.median([t for r in results[kind] for t in r["step_times"]])

    def train_s(kind: str) -> float:
        return _common.median([r["train_s"] for r in results[kind]])

    def per_run(kind: str) -> list[float]:
        return [1.0 / _common.median(r["step_times"]) for r in results[kind]]

    # repetition i of each trainer ran back to back (A B B A ...): their ratio cancels slow load drifts
    paired = [o / t for o, t in zip(per_run("OptiTrainer"), per_run("Trainer"))]
    ratio = _common.median(paired)
    pooled = steps_per_s("OptiTrainer") / steps_per_s("Trainer")
    train_ratio = train_s("Trainer") / train_s("OptiTrainer")
    same_losses = len({round(r["loss"], 10) for rs in results.values() for r in rs}) == 1
    rows = [
        {
            "trainer": kind,
            "steps_per_s": round(steps_per_s(kind), 2),
            "steps_per_s_runs_min": round(min(per_run(kind)), 2),
            "steps_per_s_runs_max": round(max(per_run(kind)), 2),
            "train_s_median": round(train_s(kind), 3),
            "final_loss": round(results[kind][0]["loss"], 6),
            "paired_ratio_vs_trainer": round(ratio, 4) if kind == "OptiTrainer" else 1.0,
            "pooled_ratio_vs_trainer": round(steps_per_s(kind) / steps_per_s("Trainer"), 4),
        }
        for kind in ("Trainer", "OptiTrainer")
    ]
    size = _common.MODEL_SIZES[SIZE]
    notes = (
        f"Model '{SIZE}' ({size.parameters():,} parameters), batch {BATCH} x {SEQ} tokens, {STEPS} steps per run, "
        f"{REPETITIONS} interleaved repetitions per trainer (A B B A ...) after one warm-up run each. A run's steps/s is "
        f"1 / its median step time; the ratio OptiTrainer/Trainer is the median over repetitions of the ratio of the "
        f"two runs made back to back = {ratio:.4f} (target >= 0.99: {'met' if ratio >= 0.99 else 'NOT met'}; "
        f"paired ratios ranged {min(paired):.3f}-{max(paired):.3f}, so the noise of this machine is of that order); "
        f"pooled over all steps of all runs: {pooled:.4f}; "
        f"train() wall-time ratio (set-up included, Trainer/OptiTrainer) = {train_ratio:.4f}. "
        f"Identical losses in every run: {'yes' if same_losses else 'NO'}. "
        f"torch threads: {torch.get_num_threads()}."
    )
    print(f"steps/s OptiTrainer/Trainer: {ratio:.4f} (target >= 0.99)")
    print(f"train() time Trainer/OptiTrainer: {train_ratio:.4f}")
    for row in rows:
        print(row)
    print(f"identical losses: {same_losses}")
    _common.write_results(
        _common.script_name(__file__),
        "Core overhead: OptiTrainer (adamw) vs transformers.Trainer, steps/s",
        rows,
        notes,
        chart={"x": "trainer", "y": ["steps_per_s"], "kind": "bar", "ylabel": "steps/s"},
        targets={"steps_per_s_ratio": {"value": round(ratio, 4), "target": ">= 0.99", "met": ratio >= 0.99}},
        machine=_common.machine(),
    )


if __name__ == "__main__":
    main()
