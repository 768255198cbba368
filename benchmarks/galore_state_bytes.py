"""GaLore optimizer-state bytes: measured on real optimizers vs the entries' analytic ``state_bytes``.

Each optimizer trains the ``27M`` model for two steps (4 x 128 tokens), then every tensor in its
``state_dict()["state"]`` is counted (each storage once: moments, projection matrices,
bitsandbytes' quantisation state); the analytic figure is the entry's ``state_bytes`` of the
model's parameter shapes. They must be equal. For scale, the analytic figures for Llama-2-7B's
shapes (on the meta device, nothing allocated) follow, with GaLore's paper setting (rank 1024).
"""

from __future__ import annotations

import _common

SIZE = "27M"
CONFIGS = [  # (label, dtype, optimizer section)
    ("adamw", "float32", {"name": "adamw"}),
    ("galore_adamw rank 128", "float32", {"name": "galore_adamw", "rank": 128}),
    ("galore_adamw rank 128, layerwise", "float32", {"name": "galore_adamw", "rank": 128, "layerwise": True}),
    ("galore_adamw rank 128, proj_type full", "float32", {"name": "galore_adamw", "rank": 128, "proj_type": "full"}),
    ("galore_adamw rank 256", "float32", {"name": "galore_adamw", "rank": 256}),
    ("galore_adafactor rank 128", "float32", {"name": "galore_adafactor", "rank": 128}),
    ("galore_adamw8bit rank 128", "float32", {"name": "galore_adamw8bit", "rank": 128}),
    ("adamw", "bfloat16", {"name": "adamw"}),
    ("galore_adamw rank 128", "bfloat16", {"name": "galore_adamw", "rank": 128}),
    ("galore_adafactor rank 128", "bfloat16", {"name": "galore_adafactor", "rank": 128}),
]
LLAMA_7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
)


def measure(dtype: str, section: dict) -> tuple[int, int]:
    """(measured, analytic) state bytes after two real training steps."""

    import optiplug
    from optiplug import optimizer_state_bytes

    model = _common.build_model(SIZE, seed=0, dtype=dtype)
    cfg = optiplug.parse_optimizer(section)
    optimizer = optiplug.build_optimizer(model, cfg)
    ids = _common.TokenDataset(n=4, vocab=_common.MODEL_SIZES[SIZE].vocab).ids
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()  # a no-op in layerwise mode: the hooks stepped during backward
        optimizer.zero_grad()
    analytic = optiplug.get_entry(cfg.name).state_bytes(optiplug.ParamShape.of_model(model), cfg)
    return optimizer_state_bytes(optimizer), int(analytic)


def llama7b_rows() -> list[dict]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import optiplug

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_7B))
    shapes = optiplug.ParamShape.of_model(model)
    rows = []
    baseline = None
    for label, section in [
        ("adamw", {"name": "adamw"}),
        ("galore_adamw rank 1024", {"name": "galore_adamw", "rank": 1024}),
        ("galore_adamw rank 512", {"name": "galore_adamw", "rank": 512}),
        ("galore_adamw8bit rank 1024", {"name": "galore_adamw8bit", "rank": 1024}),
        ("galore_adafactor rank 1024", {"name": "galore_adafactor", "rank": 1024}),
    ]:
        cfg = optiplug.parse_optimizer(section)
        analytic = int(optiplug.get_entry(cfg.name).state_bytes(shapes, cfg))
        baseline = baseline or analytic
        rows.append({"model": "Llama-2-7B (meta)", "dtype": "float32", "optimizer": label, "measured_bytes": None,
                     "analytic_bytes": analytic, "equal": None, "analytic_mib": _common.mib(analytic),
                     "vs_adamw": round(analytic / baseline, 4)})  # fmt: skip
    return rows


def main() -> None:
    import torch

    torch.set_num_threads(1)
    rows = []
    baselines: dict[str, int] = {}
    for label, dtype, section in CONFIGS:
        measured, analytic = measure(dtype, section)
        baselines.setdefault(dtype, analytic)
        rows.append({"model": SIZE, "dtype": dtype, "optimizer": label, "measured_bytes": measured,
                     "analytic_bytes": analytic, "equal": measured == analytic, "analytic_mib": _common.mib(analytic),
                     "vs_adamw": round(analytic / baselines[dtype], 4)})  # fmt: skip
        print(rows[-1], flush=True)
    rows += llama7b_rows()
    for row in rows[-5:]:
        print(row)
    mismatches = [f"{r['optimizer']} ({r['dtype']})" for r in rows if r["equal"] is False]
    notes = (
        f"Measured = every tensor storage in state_dict()['state'] after two training steps of the '{SIZE}' model "
        f"({_common.MODEL_SIZES[SIZE].parameters():,} parameters); analytic = the entry's state_bytes of the parameter "
        f"shapes. GaLore defaults otherwise (target_modules all-linear, std projection). "
        + ("Measured equals analytic in every row." if not mismatches else f"MISMATCH: {', '.join(mismatches)}.")
        + " Llama-2-7B rows are analytic only (meta device)."
    )
    _common.write_results(
        _common.script_name(__file__),
        "GaLore optimizer state: measured vs analytic bytes",
        rows,
        notes,
        targets={"measured_equals_analytic": {"value": not mismatches, "target": True, "met": not mismatches}},
        machine=_common.machine(),
    )


if __name__ == "__main__":
    main()
