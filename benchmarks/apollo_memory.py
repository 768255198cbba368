"""APOLLO's memory at the ~100M bfloat16 shape: optimizer state and peak RSS vs AdamW, GaLore and SGD.

Each run is a fresh process (so peaks do not mix): the ``100M`` model (88.1M parameters, vocab
2048, hidden 768, MLP 2048, 12 layers) in bfloat16, an OptiTrainer, batch 4 x 128 tokens, 3 steps
(the first draws every projection), gradient clipping at 1.0. GaLore and APOLLO at their defaults
(rank 128 on every attention and MLP weight; APOLLO's random projection, channel-wise scaling);
APOLLO-Mini rank 1, tensor-wise, also with the core's layerwise stepping (each gradient freed
as soon as its parameter is stepped); SGD with momentum 0.9 (one buffer per parameter: the yardstick
of APOLLO's "SGD-like memory"). The child measures the optimizer state (every tensor of
``state_dict()["state"]``), the entry's analytic ``state_bytes`` of the same shapes (they must be
equal) and its peak RSS after building the model (the baseline); the parent measures the whole
run's peak (``wait4``). The difference is what training added: gradients, optimizer state,
activations and temporaries. ``apollo_state_bytes.py`` compares the state at Llama-2-7B's shapes.
"""

from __future__ import annotations

import _child
import _common

STEPS = 3
RUNS = [
    ("adamw", {"name": "adamw", "lr": 1e-3}),
    ("sgd (momentum 0.9)", {"name": "sgd", "lr": 1e-2}),
    ("galore_adamw (rank 128)", {"name": "galore_adamw", "lr": 1e-3}),
    ("apollo_adamw (rank 128)", {"name": "apollo_adamw", "lr": 1e-3}),
    ("apollo_mini (rank 1)", {"name": "apollo_mini", "lr": 1e-3}),
    ("apollo_mini (rank 1), layerwise", {"name": "apollo_mini", "lr": 1e-3, "layerwise": True}),
]


def main() -> None:
    rows = []
    for label, optimizer in RUNS:
        child = _child.run({"optimizer": optimizer, "steps": STEPS}, label)
        rows.append(
            {
                **_child.memory_row(label, child),
                "state_bytes": child.result["state"],
                "analytic_equal": child.result["state"] == child.result["analytic"],
                "wall_s": round(child.wall_seconds, 1),
            }
        )
        print(rows[-1], flush=True)
    _child.versus_first(rows)
    reference = rows[0]
    for row in rows:
        row["state_vs_adamw"] = round(row["state_bytes"] / reference["state_bytes"], 4)
    mismatches = [r["run"] for r in rows if not r["analytic_equal"]]
    params = _common.MODEL_SIZES["100M"].parameters()
    notes = (
        f"'100M' model ({params:,} parameters, {_common.MODEL_SIZES['100M'].describe()}) in bfloat16, {STEPS} steps of "
        f"4 x 128 tokens, each run in its own process. training_added = peak RSS minus the peak after building the model. "
        + "; ".join(
            f"{r['run']}: state {r['optimizer_state_mib']} MiB ({r['state_vs_adamw']:.3f}x adamw's), peak "
            f"{r['peak_rss_mib']} MiB, added {r['training_added_mib']} MiB ({r['added_vs_adamw']:.2f}x adamw's)"
            for r in rows
        )
        + ". "
        + (
            "Measured state equals the analytic state_bytes in every run."
            if not mismatches
            else f"MISMATCH: {mismatches}."
        )
        + " One torch thread."
    )
    _common.write_results(
        _common.script_name(__file__),
        "APOLLO memory, ~100M-parameter bfloat16 run: optimizer state and peak RSS vs AdamW, SGD and GaLore",
        rows,
        notes,
        chart={"x": "run", "y": ["training_added_mib", "optimizer_state_mib"], "kind": "bar", "ylabel": "MiB"},
        targets={"measured_equals_analytic": {"value": not mismatches, "target": True, "met": not mismatches}},
        machine=_common.machine(),
    )


if __name__ == "__main__":
    main()
