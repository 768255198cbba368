"""Low-bit AdamW at the ~100M bfloat16 shape: optimizer state and peak RSS of bitsandbytes' 8-bit AdamW and torchao's
8-bit, 4-bit and FP8 AdamW vs torch's AdamW.

Each run is a fresh process (so peaks do not mix): the ``100M`` model (88.1M parameters, vocab 2048, hidden 768,
MLP 2048, 12 layers) in bfloat16, an OptiTrainer, batch 4 x 128 tokens, 3 steps, lr 1e-3 for all. The child
measures the optimizer state (every tensor of ``state_dict()["state"]``; torchao's quantized moments are written
there as their codes, scales and maps), the entry's analytic ``state_bytes`` of the same shapes (they must be
equal) and its peak RSS after building the model (the baseline); the parent measures the whole run's peak
(``wait4``). The difference is what training added: gradients, optimizer state, activations and temporaries (and,
for torchao, what ``torch.compile`` holds).
"""

from __future__ import annotations

import _child
import _common

STEPS = 3
RUNS = [
    ("adamw", {"name": "adamw", "lr": 1e-3}),
    ("bnb_adamw (8-bit)", {"name": "bnb_adamw", "bits": 8, "lr": 1e-3}),
    ("torchao_adamw8bit", {"name": "torchao_adamw8bit", "lr": 1e-3}),
    ("torchao_adamw4bit", {"name": "torchao_adamw4bit", "lr": 1e-3}),
    ("torchao_adamwfp8", {"name": "torchao_adamwfp8", "lr": 1e-3}),
]


def main() -> None:
    rows = []
    for label, optimizer in RUNS:
        child = _child.run({"optimizer": optimizer, "steps": STEPS}, label, timeout=1800)
        rows.append(
            {
                **_child.memory_row(label, child),
                "state_bytes": child.result["state"],
                "analytic_state_bytes": child.result["analytic"],
                "wall_s": round(child.wall_seconds, 1),
            }
        )
        print(rows[-1], flush=True)
    _child.versus_first(rows)
    adamw = rows[0]
    for row in rows:
        row["state_vs_adamw"] = round(row["state_bytes"] / adamw["state_bytes"], 4)
    exact = all(row["state_bytes"] == row["analytic_state_bytes"] for row in rows)
    params = _common.MODEL_SIZES["100M"].parameters()
    notes = (
        f"'100M' model ({params:,} parameters, {_common.MODEL_SIZES['100M'].describe()}) in bfloat16, {STEPS} steps of "
        "4 x 128 tokens, each run in its own process, CPU, one torch thread. AdamW's moments are bfloat16 here (the "
        "parameters' dtype), so 8-bit state is about half of AdamW's, not a quarter. "
        + "; ".join(
            f"{r['run']}: state {r['optimizer_state_mib']} MiB ({r['state_vs_adamw']}x), peak {r['peak_rss_mib']} MiB "
            f"({r['peak_vs_adamw']}x), added {r['training_added_mib']} MiB ({r['added_vs_adamw']}x)"
            for r in rows
        )
        + f". Measured state equals the analytic bytes in every run: {'yes' if exact else 'NO'}."
    )
    _common.write_results(
        _common.script_name(__file__),
        "Low-bit AdamW memory: bfloat16 100M model, bitsandbytes and torchao vs AdamW (fresh process each)",
        rows,
        notes,
        targets={"measured_equals_analytic": {"target": "True", "value": exact, "met": exact}},
        chart={"x": "run", "y": ["training_added_mib", "optimizer_state_mib"], "kind": "bar", "ylabel": "MiB"},
        machine=_common.machine(),
    )


if __name__ == "__main__":
    main()
