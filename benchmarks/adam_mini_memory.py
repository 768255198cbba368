"""Adam-mini's memory at the ~100M bfloat16 shape: optimizer state and peak RSS vs AdamW (and with ``layerwise``).

Each run is a fresh process (so peaks do not mix): the ``100M`` model (88.1M parameters, vocab
2048, hidden 768, MLP 2048, 12 layers, 12 heads) in bfloat16, an OptiTrainer, batch 4 x 128 tokens,
3 steps, gradient clipping at 1.0, lr 1e-3 for both. The child measures the optimizer state (every
tensor of ``state_dict()["state"]``), the plugin's analytic state (a first moment per weight, one
second moment per block, with the head layout read from the model's config; they must be equal)
and its peak RSS after building the model (the baseline); the parent measures the whole run's peak
(``wait4``). The difference is what training added: gradients, optimizer state, activations and
temporaries. The notes add the analytic state of Llama-2-7B's shapes (meta device).
"""

from __future__ import annotations

import _child
import _common

STEPS = 3
RUNS = [
    ("adamw", {"name": "adamw", "lr": 1e-3}),
    ("adam_mini", {"name": "adam_mini", "lr": 1e-3}),
    ("adam_mini layerwise", {"name": "adam_mini", "lr": 1e-3, "layerwise": True}),
]


def analytic_state(model, cfg) -> int:
    """The state the run's optimizer should hold, from the model's shapes and head layout (the child's check)."""
    from optiplug_adam_mini import layout_of, state_bytes_for

    import optiplug

    shapes = optiplug.ParamShape.of_model(model)
    return state_bytes_for(shapes, layout_of(model)) if cfg.name == "adam_mini" else optiplug.adam_state_bytes(shapes)


def llama7b_state() -> tuple[int, int]:
    """Analytic state of Llama-2-7B's shapes in bfloat16 (meta device: nothing allocated): (adamw, adam_mini) bytes."""
    import torch
    from optiplug_adam_mini import layout_of, state_bytes_for
    from transformers import LlamaConfig, LlamaForCausalLM

    import optiplug

    config = LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    shapes = optiplug.ParamShape.of_model(model)
    return optiplug.adam_state_bytes(shapes), state_bytes_for(shapes, layout_of(model))


def main() -> None:
    rows = []
    for label, optimizer in RUNS:
        child = _child.run(
            {"optimizer": optimizer, "steps": STEPS, "analytic": "adam_mini_memory:analytic_state"}, label
        )
        if "Adam-mini" in child.output:
            raise SystemExit(f"{label}: adam-mini's construction output reached the process output")
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
    adamw, mini, layerwise = rows
    for row in rows:
        row["state_vs_adamw"] = round(row["state_bytes"] / adamw["state_bytes"], 4)
    exact = all(row["state_bytes"] == row["analytic_state_bytes"] for row in rows)
    state_ratio = mini["state_vs_adamw"]
    adamw_7b, mini_7b = llama7b_state()
    params = _common.MODEL_SIZES["100M"].parameters()
    notes = (
        f"'100M' model ({params:,} parameters, {_common.MODEL_SIZES['100M'].describe()}) in bfloat16, {STEPS} steps of "
        f"4 x 128 tokens, each run in its own process. training_added = peak RSS minus the peak after building the "
        f"model. adam_mini: state {mini['optimizer_state_mib']} MiB vs adamw's {adamw['optimizer_state_mib']} MiB "
        f"({state_ratio:.3f}x: a first moment per weight plus one second moment per head, row or norm, "
        f"{mini['state_bytes'] - params * 2:,} bytes of second moments), peak {mini['peak_rss_mib']} MiB vs "
        f"{adamw['peak_rss_mib']} MiB ({mini['peak_vs_adamw']:.3f}x), added {mini['training_added_mib']} MiB vs "
        f"{adamw['training_added_mib']} MiB ({mini['added_vs_adamw']:.3f}x). With layerwise: true (the core steps each "
        f"parameter in its gradient hook and frees the gradient): peak {layerwise['peak_rss_mib']} MiB "
        f"({layerwise['peak_vs_adamw']:.3f}x adamw's), added {layerwise['training_added_mib']} MiB "
        f"({layerwise['added_vs_adamw']:.3f}x). Measured state equals the analytic "
        f"bytes in every run: {'yes' if exact else 'NO'}. Llama-2-7B's shapes in bfloat16 (analytic, meta device): "
        f"adam_mini {_common.mib(mini_7b)} MiB vs adamw {_common.mib(adamw_7b)} MiB ({mini_7b / adamw_7b:.3f}x). "
        "No adam-mini output on stdout. One torch thread."
    )
    _common.write_results(
        _common.script_name(__file__),
        "Adam-mini memory: bfloat16 100M model, adam_mini (and layerwise) vs adamw (fresh process each)",
        rows,
        notes,
        targets={
            "adam_mini_state_vs_adamw": {"target": "<= 0.55", "value": state_ratio, "met": state_ratio <= 0.55},
            "measured_equals_analytic": {"target": "True", "value": exact, "met": exact},
        },
        chart={"x": "run", "y": ["training_added_mib", "optimizer_state_mib"], "kind": "bar", "ylabel": "MiB"},
        machine=_common.machine(),
    )


if __name__ == "__main__":
    main()
