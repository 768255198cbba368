"""Muon vs AdamW on the embedded job: each at its best learning rate from a small sweep, same steps.

The job is exactly ``optiplug train`` with no config (the embedded tiny Llama, randomly
initialised, on the embedded corpus: 400 steps of 16 x 128 tokens, cosine schedule, seed 42),
with ``optimizer.name`` and the learning rates overridden. Each run is ``optiplug.train`` in a
fresh process with one torch thread, so runs never share a thread pool.

Swept: AdamW ``lr`` in {1e-3 (its default), 3e-3, 1e-2}; Muon ``lr`` in {0.01, 0.02 (default),
0.05} with ``adamw_lr`` 3e-3 (default), and ``adamw_lr`` in {1e-3, 1e-2} at Muon lr 0.02. The
score is the mean training loss of the last 5 logged steps (steps 360-400; a single step's loss
is noisy); the job runs ~8 epochs of its small corpus, so this is a training loss, memorization
included, not a held-out loss.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import _common

RUNS = [
    ("adamw", {"lr": 1e-3}),
    ("adamw", {"lr": 3e-3}),
    ("adamw", {"lr": 1e-2}),
    ("muon", {"lr": 0.01, "adamw_lr": 3e-3}),
    ("muon", {"lr": 0.02, "adamw_lr": 3e-3}),
    ("muon", {"lr": 0.05, "adamw_lr": 3e-3}),
    ("muon", {"lr": 0.02, "adamw_lr": 1e-3}),
    ("muon", {"lr": 0.02, "adamw_lr": 1e-2}),
]
LAST = 5  # logged steps averaged for the score

CHILD = """
import json, sys, torch
torch.set_num_threads(1)
import optiplug
result = optiplug.train(None, sys.argv[1:])
s = result.summary
print(json.dumps({"losses": result.losses, "train_time_s": s["train_time_s"], "state": s["optimizer_state_bytes"]}))
"""


def run(name: str, fields: dict[str, float], out: Path) -> dict:
    overrides = [f"optimizer.name={name}", *(f"optimizer.{k}={v}" for k, v in fields.items())]
    overrides += [f"training.output_dir={out}", "training.disable_tqdm=true"]
    child = _common.run_child([sys.executable, "-c", CHILD, *overrides], env={"OMP_NUM_THREADS": "1"})
    if child.result is None:
        raise RuntimeError(f"{name} {fields} failed:\n{child.output[-3000:]}")
    losses = child.result["losses"]
    tail = [loss for _, loss in losses[-LAST:]]
    label = f"{name} lr {fields['lr']:g}" + (f", adamw_lr {fields['adamw_lr']:g}" if "adamw_lr" in fields else "")
    return {
        "run": label,
        "optimizer": name,
        **{k: fields.get(k) for k in ("lr", "adamw_lr")},
        "final_loss": round(losses[-1][1], 4),
        "last5_mean_loss": round(sum(tail) / len(tail), 4),
        "loss_at_100": round(dict(losses).get(100, float("nan")), 4),
        "loss_at_200": round(dict(losses).get(200, float("nan")), 4),
        "train_s": child.result["train_time_s"],
        "state_mib": _common.mib(child.result["state"]),
    }


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, fields) in enumerate(RUNS):
            row = run(name, fields, Path(tmp) / str(i))
            print(json.dumps(row), flush=True)
            rows.append(row)
    best = {}
    for name in ("adamw", "muon"):
        best[name] = min((r for r in rows if r["optimizer"] == name), key=lambda r: r["last5_mean_loss"])
        best[name]["best_of_sweep"] = True
    for row in rows:
        row.setdefault("best_of_sweep", False)
    a, m = best["adamw"], best["muon"]
    notes = (
        "The embedded job (`optiplug train` defaults: embedded tiny Llama, 688,768 parameters, 400 steps of 16 x 128 "
        "tokens, cosine schedule, seed 42), one torch thread per run. Score: mean training loss of the last 5 logged "
        f"steps (~8 epochs of a small corpus: training loss, not held out). Best AdamW: lr {a['lr']:g} -> "
        f"{a['last5_mean_loss']:.3f}; best Muon: lr {m['lr']:g}, adamw_lr {m['adamw_lr']:g} -> {m['last5_mean_loss']:.3f} "
        f"({m['last5_mean_loss'] - a['last5_mean_loss']:+.3f}). Train time is on a shared 2-core machine (indicative)."
    )
    _common.write_results(
        _common.script_name(__file__),
        "Muon vs AdamW on the embedded job: learning-rate sweep, same steps, final training loss",
        rows,
        notes,
        chart={"x": "run", "y": ["last5_mean_loss"], "kind": "bar", "ylabel": "training loss (last 5 logged steps)"},
        machine=_common.machine(),
    )


if __name__ == "__main__":
    main()
