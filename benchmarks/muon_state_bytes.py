"""Muon's optimizer state vs AdamW's: analytic (``state_bytes``, what ``optiplug estimate`` shows) and measured.

For the 27M and 100M models in float32 and bfloat16: ``muon``'s entry ``state_bytes`` (one momentum
buffer per Muon matrix; two moments and a float32 step per AdamW tensor) against AdamW's, and the
measured state (``optiplug.optimizer_state_bytes``: every tensor in ``state_dict()["state"]``) after
one step with random gradients. Measured must equal analytic.
"""

from __future__ import annotations

import _common

CASES = [("27M", "float32"), ("27M", "bfloat16"), ("100M", "float32"), ("100M", "bfloat16")]


def main() -> None:
    import torch

    import optiplug

    torch.set_num_threads(1)
    rows = []
    for size, dtype in CASES:
        model = _common.build_model(size, seed=0, dtype=dtype)
        shapes = optiplug.ParamShape.of_model(model)
        muon_cfg = optiplug.get_entry("muon").config()
        analytic = optiplug.get_entry("muon").state_bytes(shapes, muon_cfg)
        adamw = optiplug.adam_state_bytes(shapes)
        generator = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.grad = (torch.randn(p.shape, generator=generator) * 1e-3).to(p.dtype)
        optimizer = optiplug.build_optimizer(model, muon_cfg)
        optimizer.step()
        measured = optiplug.optimizer_state_bytes(optimizer)
        row = {
            "label": f"{size} {dtype}",
            "size": size,
            "dtype": dtype,
            "split": optimizer.routing.summary(),
            "muon_state_mib": _common.mib(analytic),
            "adamw_state_mib": _common.mib(adamw),
            "muon_vs_adamw": round(analytic / adamw, 3),
            "measured_mib": _common.mib(measured),
            "measured_equals_analytic": measured == analytic,
        }
        rows.append(row)
        print(row, flush=True)
        del model, optimizer
    exact = all(r["measured_equals_analytic"] for r in rows)
    notes = (
        "State of muon (defaults) vs AdamW (two moments + a float32 step per tensor), analytic from parameter shapes "
        "and measured after one step (every tensor in state_dict()['state']). "
        + "; ".join(f"{r['label']}: {r['split']}, {r['muon_vs_adamw']:.3f}x AdamW" for r in rows)
        + f". Measured equals analytic in every case: {'yes' if exact else 'NO'}. Muon keeps one buffer per matrix "
        "and no step counter, so the state of the matrices is half AdamW's; the embedding and head stay on AdamW."
    )
    _common.write_results(
        _common.script_name(__file__),
        "Muon optimizer state vs AdamW (analytic = measured)",
        rows,
        notes,
        chart={
            "x": "label",
            "y": ["muon_state_mib", "adamw_state_mib"],
            "kind": "bar",
            "ylabel": "MiB of optimizer state",
        },
        targets={"measured_equals_analytic": {"value": exact, "target": True, "met": exact}},
        machine=_common.machine(),
    )


if __name__ == "__main__":
    main()
