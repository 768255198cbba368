"""Peak resident memory of a ~100M-parameter bfloat16 training run: adamw vs galore_adamw vs layerwise.

Each run is a fresh process (so peaks do not mix): the ``100M`` model (88.1M parameters, vocab
2048, hidden 768, MLP 2048, 12 layers) in bfloat16, an OptiTrainer, batch 4 x 128 tokens,
3 steps (the first recomputes every projection), gradient clipping at 1.0. GaLore: rank 128
(default) on every attention and MLP weight, randomized projection. The child reports its peak
RSS after building the model (the baseline: Python, torch, transformers, weights) and the parent
measures the whole run's peak (``wait4``); the difference is what training added: gradients,
optimizer state, activations and temporaries.
"""

from __future__ import annotations

import json

import _common

STEPS = 3
RUNS = [
    ("adamw", {"name": "adamw", "lr": 1e-3}),
    ("galore_adamw", {"name": "galore_adamw", "lr": 1e-3}),
    ("galore_adamw layerwise", {"name": "galore_adamw", "lr": 1e-3, "layerwise": True}),
]

CHILD = """
import json, tempfile
import torch
import _common, optiplug
from optiplug.helpers import optimizer_state_bytes
from optiplug.app.measure import peak_rss_bytes
torch.set_num_threads(1)
model = _common.build_model("100M", seed=0, dtype="bfloat16")
data = _common.TokenDataset(n=16, vocab=2048)
baseline = peak_rss_bytes()
with tempfile.TemporaryDirectory() as tmp:
    trainer = optiplug.OptiTrainer(
        model=model, args=_common.training_args(tmp, max_steps={steps}, per_device_train_batch_size=4),
        train_dataset=data, optimizer=json.loads({optimizer!r}),
    )
    trainer.train()
from optiplug.helpers import unwrap_optimizer
print(json.dumps({{"baseline": baseline, "state": optimizer_state_bytes(unwrap_optimizer(trainer.optimizer)),
                  "params": sum(p.numel() for p in model.parameters())}}))
"""


def main() -> None:
    rows = []
    for label, optimizer in RUNS:
        child = _common.run_python(CHILD.format(steps=STEPS, optimizer=json.dumps(optimizer)), timeout=900)
        if child.returncode != 0 or child.result is None:
            raise SystemExit(f"{label} failed:\n{child.output[-3000:]}")
        peak, baseline = child.peak_rss_bytes, child.result["baseline"]
        rows.append(
            {
                "run": label,
                "peak_rss_mib": _common.mib(peak),
                "baseline_mib": _common.mib(baseline),
                "training_added_mib": _common.mib(peak - baseline),
                "optimizer_state_mib": _common.mib(child.result["state"]),
                "wall_s": round(child.wall_seconds, 1),
            }
        )
        print(rows[-1], flush=True)
    reference = rows[0]
    for row in rows:
        row["peak_vs_adamw"] = round(row["peak_rss_mib"] / reference["peak_rss_mib"], 3)
        row["added_vs_adamw"] = round(row["training_added_mib"] / reference["training_added_mib"], 3)
    params = _common.MODEL_SIZES["100M"].parameters()
    notes = (
        f"'100M' model ({params:,} parameters, {_common.MODEL_SIZES['100M'].describe()}) in bfloat16, {STEPS} steps of "
        f"4 x 128 tokens, each run in its own process. training_added = peak RSS minus the peak after building the model. "
        + "; ".join(
            f"{r['run']}: peak {r['peak_rss_mib']} MiB, added {r['training_added_mib']} MiB "
            f"({r['added_vs_adamw']:.2f}x adamw's)"
            for r in rows
        )
        + ". One torch thread."
    )
    _common.write_results(
        _common.script_name(__file__),
        "Peak resident memory, ~100M-parameter bfloat16 run: adamw vs GaLore vs layerwise GaLore",
        rows,
        notes,
        chart={"x": "run", "y": ["training_added_mib", "optimizer_state_mib"], "kind": "bar", "ylabel": "MiB"},
        machine=_common.machine(),
    )


if __name__ == "__main__":
    main()
