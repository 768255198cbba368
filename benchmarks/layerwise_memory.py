"""Peak resident memory and speed of a ~100M-parameter bfloat16 run: adamw vs adamw with ``layerwise: true``.

Each run is a fresh process (so peaks do not mix): the ``100M`` model (88.1M parameters, vocab
2048, hidden 768, MLP 2048, 12 layers) in bfloat16, an OptiTrainer, batches of 4 x 128 tokens (as
galore_memory.py) and of 1 x 128 (activations small beside the gradients), torch's AdamW (fused),
gradient clipping at 1.0 (per parameter in layerwise mode). The child reports its peak
RSS after building the model (the baseline: Python, torch, transformers, weights) and the parent
measures the whole run's peak (``wait4``); the difference is what training added: gradients,
optimizer state, activations and temporaries. Layerwise stepping frees each gradient in its hook, so
the gradient buffer (the size of the weights, 168 MiB here) should vanish from the peak.

Speed: the steps after the first (its lazy state allocation is not typical) are timed with a
callback, and the two optimizers take turns (A B B A ...) so a drift in the machine's load hits both.
"""

from __future__ import annotations

import _child
import _common

STEPS = 6
REPEATS = 3  # runs per optimizer and batch, alternating; peaks and speeds are the medians
BATCHES = (4, 1)  # 4 x 128 tokens as galore_memory.py; 1 x 128, where activations are small beside the gradients
LOGGED = {"max_grad_norm": 1.0, "logging_strategy": "steps", "logging_steps": 1}  # a loss per step
RUNS = [
    ("adamw", {"name": "adamw", "lr": 1e-3}),
    ("adamw layerwise", {"name": "adamw", "lr": 1e-3, "layerwise": True}),
]


def _measure(batch: int) -> list[dict]:
    samples: dict[str, list] = {label: [] for label, _ in RUNS}
    for rep in range(REPEATS):
        for label, optimizer in RUNS if rep % 2 == 0 else list(reversed(RUNS)):
            spec = {"optimizer": optimizer, "steps": STEPS, "batch": batch, "blocks": 32, "args": LOGGED, "timed": True}
            child = _child.run(spec, label)
            samples[label].append(child)
            print(batch, label, _common.mib(child.peak_rss_bytes), child.result["steps_per_s"], flush=True)
    rows = []
    for label, _ in RUNS:
        runs = samples[label]
        peak = _common.median([c.peak_rss_bytes for c in runs])
        baseline = _common.median([c.result["baseline"] for c in runs])
        first = runs[0].result
        rows.append(
            {
                "run": f"{label}, batch {batch} x 128",
                "peak_rss_mib": _common.mib(peak),
                "baseline_mib": _common.mib(baseline),
                "training_added_mib": _common.mib(peak - baseline),
                "optimizer_state_mib": _common.mib(first["state"]),
                "gradient_buffer_mib": _common.mib(first["grad_bytes"]),
                "steps_per_s": round(_common.median([c.result["steps_per_s"] for c in runs]), 4),
                "steps_per_s_runs": [round(c.result["steps_per_s"], 3) for c in runs],
                "layerwise": first["layerwise"],
                "losses": [round(x, 4) for x in first["losses"]],
            }
        )
    _child.versus_first(rows)
    reference = rows[0]
    for row in rows:
        row["saved_mib"] = round(reference["peak_rss_mib"] - row["peak_rss_mib"], 1)
        row["speed_vs_adamw"] = round(row["steps_per_s"] / reference["steps_per_s"], 3)
    return rows


def main() -> None:
    rows = [row for batch in BATCHES for row in _measure(batch)]
    params = _common.MODEL_SIZES["100M"].parameters()
    summary = "; ".join(
        f"batch {batch} x 128: layerwise peak {lw['peak_rss_mib']} vs {ref['peak_rss_mib']} MiB "
        f"({lw['peak_vs_adamw']:.3f}x, {lw['saved_mib']} MiB less; training added {lw['added_vs_adamw']:.3f}x), "
        f"{lw['steps_per_s']} vs {ref['steps_per_s']} steps/s ({lw['speed_vs_adamw']:.3f}x; each run: "
        f"{lw['steps_per_s_runs']} vs {ref['steps_per_s_runs']})"
        for batch, (ref, lw) in zip(BATCHES, zip(rows[::2], rows[1::2]))
    )
    notes = (
        f"'100M' model ({params:,} parameters, {_common.MODEL_SIZES['100M'].describe()}) in bfloat16, {STEPS} steps, "
        f"torch's fused AdamW, clipping at 1.0 (per parameter when layerwise), one torch thread; each run in its own "
        f"process, {REPEATS} runs per optimizer and batch taking turns, medians; steps 2-{STEPS} timed. "
        f"training_added = peak RSS minus the peak after building the model. The gradient buffer is "
        f"{rows[0]['gradient_buffer_mib']} MiB. {summary}. Layerwise, the peak is at the start of backward "
        f"(every activation alive, no gradient), instead of where activations and gradients overlap: the saving "
        f"approaches the gradient buffer as activations get small beside it. The losses differ after step 1 only "
        f"through the clipping (per parameter vs global; without clipping they are equal bit for bit, "
        f"tests/test_layerwise.py)."
    )
    _common.write_results(
        _common.script_name(__file__),
        "Layerwise stepping: peak resident memory and speed, ~100M-parameter bfloat16 run, adamw vs layerwise adamw",
        [{k: v for k, v in row.items() if k not in ("losses", "steps_per_s_runs")} for row in rows],
        notes,
        chart={"x": "run", "y": ["training_added_mib", "optimizer_state_mib"], "kind": "bar", "ylabel": "MiB"},
        machine=_common.machine(),
        losses={row["run"]: row["losses"] for row in rows},
    )


if __name__ == "__main__":
    main()
