"""GaLore optimizer step time: optiplug-galore (randomized, svd) vs transformers' galore_adamw vs fused AdamW.

The ``27M`` model's gradients are set to fixed random tensors and each optimizer steps on its own
copy of the model; only ``optimizer.step()`` is timed. GaLore settings: rank 128 on every
attention and MLP weight (``target_modules: ["self_attn", "mlp"]`` for both wirings), scale 0.25,
``std`` projection, and ``update_proj_gap`` 4 so that every fourth step is a refresh step (the
projection recomputed) and the others are normal steps. transformers' optimizer is built exactly as its
Trainer builds it (``optim="galore_adamw"``, ``optim_target_modules``, ``optim_args``), i.e.
galore-torch's ``GaLoreAdamW``. Fused AdamW is torch's ``AdamW(fused=True)``.

Reported per optimizer: median time of a normal step and of a refresh step (the first step,
which also allocates the state, is left out), and the amortised step time over
``update_proj_gap`` 50 and 200: ``(refresh + (gap - 1) x normal) / gap``. The candidates step
in turn (A B C D, then D C B A, ...) so load drifts on the machine hit all of them alike; one
torch thread.
"""

from __future__ import annotations

import tempfile

import _common

SIZE = "27M"
RANK = 128
GAP = 4  # update_proj_gap of the measured run: steps 4, 8, 12 refresh the projection, the others are normal
ROUNDS = 4  # after the first step: 3 x ROUNDS normal and ROUNDS refresh steps per optimizer
TARGETS = ["self_attn", "mlp"]


def _model_with_grads():
    import torch

    model = _common.build_model(SIZE, seed=0)
    generator = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    return model


def build(kind: str, tmp: str):
    import torch

    import optiplug

    model = _model_with_grads()
    if kind == "fused adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    if kind == "transformers galore_adamw":
        import warnings

        from transformers import Trainer, TrainingArguments

        args = TrainingArguments(
            output_dir=tmp, optim="galore_adamw", optim_target_modules=TARGETS, learning_rate=1e-3, report_to="none",
            optim_args=f"rank={RANK},update_proj_gap={GAP},scale=0.25,proj_type=std", use_cpu=True,
        )  # fmt: skip
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls(kwargs.pop("params"), **kwargs)
    projection = kind.split("(")[1].rstrip(")")
    return optiplug.build_optimizer(
        model,
        {"name": "galore_adamw", "target_modules": TARGETS, "rank": RANK, "update_proj_gap": GAP, "scale": 0.25,
         "projection": projection, "lr": 1e-3},
    )  # fmt: skip


def main() -> None:
    import torch

    torch.set_num_threads(1)
    kinds = ["optiplug-galore (randomized)", "optiplug-galore (svd)", "transformers galore_adamw", "fused adamw"]
    with tempfile.TemporaryDirectory() as tmp:
        optimizers = {kind: build(kind, tmp) for kind in kinds}
        for optimizer in optimizers.values():
            optimizer.step()  # step 0: allocates the state (and is a refresh)
        times: dict[str, dict[str, list[float]]] = {kind: {"normal": [], "refresh": []} for kind in kinds}
        for step in range(1, GAP * ROUNDS + 1):
            phase = "refresh" if step % GAP == 0 else "normal"
            order = kinds if step % 2 else list(reversed(kinds))
            for kind in order:
                times[kind][phase].append(_common.timed(optimizers[kind].step))
    rows = []
    for kind in kinds:
        normal = _common.median(times[kind]["normal"])
        refresh = _common.median(times[kind]["refresh"]) if kind != "fused adamw" else normal
        row = {
            "optimizer": kind,
            "normal_ms": round(1000 * normal, 1),
            "refresh_ms": round(1000 * refresh, 1),
            "amortised_gap50_ms": round(1000 * (refresh + 49 * normal) / 50, 1),
            "amortised_gap200_ms": round(1000 * (refresh + 199 * normal) / 200, 1),
        }
        rows.append(row)
    reference = next(r for r in rows if r["optimizer"] == "transformers galore_adamw")
    for row in rows:
        for key in ("normal_ms", "refresh_ms", "amortised_gap50_ms", "amortised_gap200_ms"):
            row[f"{key.removesuffix('_ms')}_vs_galore_torch"] = round(row[key] / reference[key], 3)
        print(row)
    plugin = [r for r in rows if r["optimizer"].startswith("optiplug")]
    slower = [
        f"{r['optimizer']} {key}"
        for r in plugin
        for key in ("normal", "refresh", "amortised_gap50", "amortised_gap200")
        if r[f"{key}_vs_galore_torch"] > 1.0
    ]
    size = _common.MODEL_SIZES[SIZE]
    notes = (
        f"Model '{SIZE}' ({size.parameters():,} parameters: {size.describe()}), random gradients, rank {RANK} on the "
        f"attention and MLP weights, {(GAP - 1) * ROUNDS} normal and {ROUNDS} refresh steps per optimizer after the first, medians, "
        f"one torch thread. Ratios are against transformers' galore_adamw (galore-torch). "
        + (
            f"Slower than galore-torch: {', '.join(slower)}."
            if slower
            else "optiplug-galore is nowhere slower than galore-torch."
        )
    )
    _common.write_results(
        _common.script_name(__file__),
        "GaLore optimizer step time: optiplug-galore vs transformers' galore_adamw vs fused AdamW",
        rows,
        notes,
        chart={"x": "optimizer", "y": ["normal_ms", "amortised_gap200_ms"], "kind": "bar", "ylabel": "ms per step"},
        targets={"not_slower_than_galore_torch": {"value": slower or "none", "target": "none", "met": not slower}},
        machine=_common.machine(),
    )


if __name__ == "__main__":
    main()
