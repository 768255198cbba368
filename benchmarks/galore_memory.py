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

import _child
import _common

STEPS = 3
RUNS = [
    ("adamw", {"name": "adamw", "lr": 1e-3}),
    ("galore_adamw", {"name": "galore_adamw", "lr": 1e-3}),
    ("galore_adamw layerwise", {"name": "galore_adamw", "lr": 1e-3, "layerwise": True}),
]


def main() -> None:
    rows = []
    for label, optimizer in RUNS:
        child = _child.run({"optimizer": optimizer, "steps": STEPS}, label)
        rows.append(
            {
                **_child.memory_row(label, child),
                "wall_s": round(child.wall_seconds, 1),
            }
        )
        print(rows[-1], flush=True)
    _child.versus_first(rows)
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
