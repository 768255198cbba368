"""Muon optimizer step time vs fused AdamW at the 27M and 100M shapes (the Newton-Schulz cost).

Each model's gradients are set to fixed random tensors and each optimizer steps its own copy of
the model; only ``optimizer.step()`` is timed. Candidates:

* ``fused adamw``: torch's ``AdamW(fused=True)`` on every parameter;
* ``optiplug muon``: ``optiplug.build_optimizer(model, "muon")`` (defaults: torch's Muon, 5
  Newton-Schulz steps, on the 2-D hidden matrices; fused AdamW on embedding, head and norms);
* ``torch Muon + AdamW by hand``: ``torch.optim.Muon`` and ``torch.optim.AdamW(fused=True)`` on
  the same split, stepped one after the other (the wiring the other frameworks write), to show
  what the single combined optimizer costs on top.

The first step (allocating the state) is left out; the candidates step in turn (A B C, C B A, ...),
one torch thread, median of the timed steps. torch's Newton-Schulz runs in bfloat16 whatever the
weights' dtype; on this CPU (AVX512-BF16, no AMX) that matmul is what the Muon step costs.
"""

from __future__ import annotations

import _common

SIZES = {"27M": 4, "100M": 2}  # timed steps per candidate after the first
KINDS = ["fused adamw", "optiplug muon", "torch Muon + AdamW by hand"]


def _model_with_grads(size: str):
    import torch

    model = _common.build_model(size, seed=0)
    generator = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    return model


class _Both:
    """Two torch optimizers stepped one after the other."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()


def build(kind: str, size: str):
    import torch

    import optiplug

    model = _model_with_grads(size)
    if kind == "fused adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True), None
    optimizer = optiplug.build_optimizer(model, "muon")
    if kind == "optiplug muon":
        return optimizer, optimizer.routing
    on_muon = {id(p) for g in optimizer.param_groups if g["use_muon"] for p in g["params"]}
    muon = [p for p in model.parameters() if id(p) in on_muon]
    rest = [p for p in model.parameters() if id(p) not in on_muon]
    return _Both(
        torch.optim.Muon(muon, lr=0.02, weight_decay=0.0),
        torch.optim.AdamW(rest, lr=3e-3, betas=(0.9, 0.95), fused=True),
    ), None


def main() -> None:
    import torch

    torch.set_num_threads(1)
    rows = []
    for size, steps in SIZES.items():
        built = {kind: build(kind, size) for kind in KINDS}
        routing = built["optiplug muon"][1]
        optimizers = {kind: value[0] for kind, value in built.items()}
        for optimizer in optimizers.values():
            optimizer.step()
        times = _common.interleaved({kind: lambda o=optimizers[kind]: _common.timed(o.step) for kind in KINDS}, steps)
        adamw = _common.median(times["fused adamw"])
        for kind in KINDS:
            step = _common.median(times[kind])
            row = {
                "size": size,
                "optimizer": kind,
                "label": f"{size} {kind}",
                "step_ms": round(1000 * step, 1),
                "vs_fused_adamw": round(step / adamw, 2),
                "steps_timed": steps,
            }
            rows.append(row)
            print(row, flush=True)
        rows[-2]["split"] = routing.summary()
        del built, optimizers
    by = {(r["size"], r["optimizer"]): r for r in rows}
    overhead = {
        size: by[(size, "optiplug muon")]["step_ms"] / by[(size, "torch Muon + AdamW by hand")]["step_ms"]
        for size in SIZES
    }
    notes = (
        "Random gradients, one torch thread, first step left out, median of "
        f"{', '.join(f'{n} steps ({s})' for s, n in SIZES.items())} per candidate, interleaved. Models: "
        + "; ".join(
            f"'{s}' {_common.MODEL_SIZES[s].parameters():,} parameters ({_common.MODEL_SIZES[s].describe()})"
            for s in SIZES
        )
        + ". Muon split: "
        + "; ".join(f"{r['size']}: {r['split']}" for r in rows if "split" in r)
        + ". optiplug muon / torch's two optimizers by hand: "
        + ", ".join(f"{s} {v:.2f}x" for s, v in overhead.items())
        + ". On a CPU the step is dominated by the bfloat16 Newton-Schulz matmuls (5 iterations of 3 matmuls per "
        "matrix: ~0.34 TFLOP per step at 27M, ~1.7 TFLOP at 100M; not measured on a GPU here). A shared 2-core "
        "machine: ratios are indicative."
    )
    _common.write_results(
        _common.script_name(__file__),
        "Muon optimizer step time vs fused AdamW (27M and 100M models)",
        rows,
        notes,
        chart={"x": "label", "y": ["step_ms"], "kind": "bar", "ylabel": "ms per optimizer step"},
        machine=_common.machine(),
    )


if __name__ == "__main__":
    main()
