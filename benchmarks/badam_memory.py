"""Peak resident memory of a short bfloat16 training run of the ``100M`` model: ``badam`` vs ``adamw``.

Each run is a fresh process (so its peak is its own): the ``100M`` model, saved once in bfloat16
and loaded with ``from_pretrained`` as a fine-tuning run starts (so no run carries the float32
temporaries of random initialisation), 4 optimizer steps of batch 2 x 128 tokens through a
Trainer (``OptiTrainer`` for
``adamw`` and ``badam``; a plain Trainer wired as LLaMA-Factory does for the reference),
BAdam switching blocks every 2 steps. Reported per run: the peak resident memory (``VmHWM``),
the resident memory after the imports (interpreter, torch, transformers: the same for every
run) and the peak above that, and the optimizer state at the end. Target: badam's peak <= 0.6x
adamw's.

AdamW on bfloat16 weights holds bfloat16 gradients for every weight and two bfloat16 moments;
BAdam holds gradients of the active block only, plus a float32 master copy, float32 gradient
and float32 moments of that block.
"""

from __future__ import annotations

import tempfile

import _badam
import _child
import _common

SIZE = "100M"
STEPS, BATCH, SEQ, SWITCH_EVERY = 4, 2, 128, 2
KINDS = ("adamw", "badam", "badam-reference")


def reference_trainer(model, args, data):
    """The child's trainer for ``badam-reference``: BAdam wired by hand as LLaMA-Factory does."""
    return _badam.reference_trainer(model, args, data, switch_every=SWITCH_EVERY)


def reference_state(trainer) -> int:
    """The reference's optimizer state: its base optimizer's plus the float32 master copies badam keeps aside."""
    import optiplug

    masters = list(trainer.optimizer.optimizer.param_idx2hp.values())
    return optiplug.optimizer_state_bytes(trainer.optimizer) + optiplug.tensor_bytes(masters)


def spec(kind: str, model_dir: str) -> dict:
    """The child's run of ``kind`` (benchmarks/_child.py): the saved model, STEPS steps of BATCH x SEQ tokens."""
    run = {"model_dir": model_dir, "steps": STEPS, "batch": BATCH, "blocks": BATCH * STEPS, "seq_len": SEQ}
    run.update(args={"learning_rate": 1e-4}, quiet=True)
    if kind == "badam-reference":
        return {**run, "trainer": "badam_memory:reference_trainer", "state": "badam_memory:reference_state"}
    if kind == "badam":
        return {**run, "optimizer": {"name": "badam", "switch_every": SWITCH_EVERY, "lr": 1e-4}}
    return {**run, "optimizer": {"name": "adamw", "lr": 1e-4}}


def main() -> None:
    results = {}
    with tempfile.TemporaryDirectory() as model_dir:
        _badam.build_model(SIZE, "bfloat16").save_pretrained(model_dir)
        for kind in KINDS:
            run = _child.run(spec(kind, model_dir), f"{kind} run", timeout=600)
            results[kind] = run.result
            print(kind, run.result, flush=True)
    adamw = results["adamw"]
    rows = []
    for kind in KINDS:
        r = results[kind]
        above = r["peak"] - r["after_imports"]
        rows.append({
            "optimizer": {"badam": "badam (optiplug-badam)", "badam-reference": "badam (LLaMA-Factory wiring)"}.get(kind, kind),
            "peak_rss_mib": _common.mib(r["peak"]),
            "peak_vs_adamw": round(r["peak"] / adamw["peak"], 3),
            "after_imports_mib": _common.mib(r["after_imports"]),
            "peak_above_imports_mib": _common.mib(above),
            "above_imports_vs_adamw": round(above / (adamw["peak"] - adamw["after_imports"]), 3),
            "optimizer_state_mib": _common.mib(r["state"]),
        })  # fmt: skip
    ratio = rows[1]["peak_vs_adamw"]
    params = results["adamw"]["params"]
    _common.write_results(
        _common.script_name(__file__),
        "BAdam peak memory: bfloat16 100M model, badam vs adamw (fresh process each)",
        rows,
        notes=(
            f"Model {SIZE} ({_common.MODEL_SIZES[SIZE].describe()}; {params:,} parameters) loaded in bfloat16, "
            f"{STEPS} steps of batch {BATCH} x {SEQ} tokens through a Trainer on CPU, one process per run; BAdam "
            f"switches every {SWITCH_EVERY} steps (12 blocks). Peak = VmHWM of the run's process; 'above imports' "
            "subtracts the resident memory after importing torch and transformers, the same in every run. "
            f"badam / adamw peak = {ratio} (target <= 0.6)."
        ),
        targets={"badam_peak_vs_adamw": {"target": "<= 0.6", "value": ratio, "met": ratio <= 0.6}},
        chart={"x": "optimizer", "y": ["peak_rss_mib", "peak_above_imports_mib"], "kind": "bar", "ylabel": "MiB"},
        machine=_common.machine(),
    )


if __name__ == "__main__":
    main()
