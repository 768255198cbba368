"""APOLLO's optimizer state for Llama-2-7B's shapes, analytic (meta device: nothing allocated), vs AdamW, SGD, GaLore.

The entries' ``state_bytes`` equal the measured state byte for byte (``apollo_memory.py`` checks it on
the ``100M`` model, the plugin's tests on every configuration); here they give the figures at the
scale APOLLO's paper is about, in bfloat16 (weights, gradients and states in bf16, as in
``apollo_memory.py``). GaLore's paper setting is rank 1024; APOLLO's a quarter of the hidden size
(1024) or 256, and rank 1 for APOLLO-Mini.
"""

from __future__ import annotations

import _common

LLAMA_7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
)
RUNS = [
    ("adamw", {"name": "adamw"}),
    ("sgd (momentum 0.9)", {"name": "sgd"}),
    ("galore_adamw rank 1024", {"name": "galore_adamw", "rank": 1024}),
    ("apollo_adamw rank 1024", {"name": "apollo_adamw", "rank": 1024}),
    ("apollo_adamw rank 256", {"name": "apollo_adamw", "rank": 256}),
    ("apollo_mini (rank 1)", {"name": "apollo_mini"}),
]


def main() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import optiplug

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_7B)).to(torch.bfloat16)
    shapes = optiplug.ParamShape.of_model(model)
    rows: list[dict] = []
    for label, section in RUNS:
        cfg = optiplug.parse_optimizer(section)
        analytic = int(optiplug.get_entry(cfg.name).state_bytes(shapes, cfg))
        rows.append({"optimizer": label, "state_bytes": analytic, "state_gib": round(analytic / 2**30, 2)})
    adamw = rows[0]["state_bytes"]
    for row in rows:
        row["vs_adamw"] = round(row["state_bytes"] / adamw, 4)
        print(row, flush=True)
    params = sum(s.numel for s in shapes)
    notes = (
        f"Llama-2-7B shapes ({params:,} parameters) in bfloat16, analytic state_bytes of each entry. "
        + "; ".join(f"{r['optimizer']}: {r['state_gib']} GiB ({r['vs_adamw']:.3f}x adamw's)" for r in rows)
        + ". APOLLO keeps the full-size AdamW moments of the embedding and the head (all-linear leaves the head out)."
    )
    _common.write_results(
        _common.script_name(__file__),
        "APOLLO optimizer state at Llama-2-7B's shapes (analytic, bfloat16) vs AdamW, SGD and GaLore",
        rows,
        notes,
        chart={"x": "optimizer", "y": ["state_gib"], "kind": "bar", "ylabel": "GiB"},
        machine=_common.machine(),
    )


if __name__ == "__main__":
    main()
