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

import json
import sys
import tempfile

import _badam
import _common

SIZE = "100M"
STEPS, BATCH, SEQ, SWITCH_EVERY = 4, 2, 128, 2
KINDS = ("adamw", "badam", "badam-reference")


def _rss() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def child(kind: str, model_dir: str) -> None:
    import torch
    from transformers import LlamaForCausalLM

    import optiplug
    from optiplug.app.measure import peak_rss_bytes
    from optiplug.helpers import optimizer_state_bytes

    torch.set_num_threads(1)
    after_imports = _rss()
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    after_model = _rss()
    data = _common.TokenDataset(n=BATCH * STEPS, seq_len=SEQ)
    with tempfile.TemporaryDirectory() as out:
        args = _common.training_args(out, max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=1e-4)
        if kind == "badam-reference":
            trainer = _badam.reference_trainer(model, args, data, switch_every=SWITCH_EVERY)
        else:
            optimizer = (
                {"name": "badam", "switch_every": SWITCH_EVERY, "lr": 1e-4}
                if kind == "badam"
                else {"name": "adamw", "lr": 1e-4}
            )
            trainer = optiplug.OptiTrainer(model=model, args=args, train_dataset=data, optimizer=optimizer)
        with _badam.quiet():
            trainer.train()
    state = optimizer_state_bytes(trainer.optimizer)
    if kind == "badam-reference":
        from optiplug.helpers import tensor_bytes

        state += tensor_bytes(list(trainer.optimizer.optimizer.param_idx2hp.values()))
    print(json.dumps({
        "kind": kind,
        "parameters": sum(p.numel() for p in model.parameters()),
        "after_imports": after_imports,
        "after_model": after_model,
        "peak": peak_rss_bytes(),
        "state": state,
    }))  # fmt: skip


def main() -> None:
    results = {}
    with tempfile.TemporaryDirectory() as model_dir:
        _badam.build_model(SIZE, "bfloat16").save_pretrained(model_dir)
        for kind in KINDS:
            run = _common.run_child([sys.executable, __file__, "--child", kind, model_dir], timeout=600)
            if run.returncode != 0 or not isinstance(run.result, dict):
                raise SystemExit(f"{kind} run failed:\n{run.output[-3000:]}")
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
    params = results["adamw"]["parameters"]
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
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    else:
        main()
