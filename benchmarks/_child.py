"""One measured training run in a fresh process: the child every memory benchmark runs its runs with.

    python benchmarks/_child.py '{"optimizer": {"name": "adamw", "lr": 1e-3}, "steps": 3}'

(:func:`run` starts it for a benchmark.) A fresh process per run, so one run's peak never carries
another's. The child builds the model (a named size of ``_common.MODEL_SIZES`` in its dtype, seed 0,
or one saved with ``save_pretrained``, loaded as a fine-tuning run loads it), fixed token blocks,
and trains with an ``OptiTrainer`` (or the benchmark's own trainer), one torch thread. Its last
output line is the JSON of what it measured:

* ``after_imports``: resident bytes after importing torch, transformers and optiplug;
* ``baseline``: the peak resident bytes after building the model and the data;
* ``peak``: its own peak resident bytes at the end (``VmHWM``; the parent also has ``wait4``'s);
* ``state``: the optimizer's state bytes at the end; ``analytic``: the entry's ``state_bytes`` of the same
  shapes (or the benchmark's own function), None where there is none;
* ``params``, ``grad_bytes`` (one gradient per parameter at its dtype), ``layerwise`` (whether the core
  stepped each parameter in its gradient hook), ``steps_per_s`` (between the first and last step's end)
  and ``losses`` (logged ones).

The spec's fields, all optional but ``optimizer`` (unless ``trainer`` is given): ``size`` ("100M"),
``dtype`` ("bfloat16"), ``model_dir``, ``blocks`` (16), ``seq_len`` (``_common.SEQ_LEN``), ``steps``
(3), ``batch`` (4), ``args`` (more ``TrainingArguments`` fields), ``quiet`` (swallow the run's prints
and warnings), and ``"module:function"`` names, imported from ``benchmarks/``: ``trainer`` (``f(model,
args, data)``: the trainer instead of an ``OptiTrainer``), ``state`` (``f(trainer)``: the state bytes) and
``analytic`` (``f(model, cfg)``: the analytic state bytes), and ``timed`` (measure ``steps_per_s``; None
without it).

Nothing but the run itself happens between the baseline and the end, so the figures are those the earlier
per-benchmark child scripts measured (a ``timed`` run imports transformers' trainer modules before the
baseline, as ``layerwise_memory.py``'s always did; the others import them while training).
"""

from __future__ import annotations

import importlib
import json
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import _common


def _rss() -> int:
    """Resident bytes now (``VmRSS``)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _function(name: str) -> Callable[..., Any]:
    """``"module:function"`` of ``benchmarks/``."""
    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Train as ``spec`` says (see the module's docstring) in this process and return what was measured."""
    import time

    import torch
    from transformers import LlamaForCausalLM

    import optiplug
    from optiplug.app.measure import peak_rss_bytes

    torch.set_num_threads(1)
    after_imports = _rss()
    ends: list[float] = []
    callbacks = []
    if spec.get("timed"):  # its import (transformers' trainer modules) lands in the baseline, as it always did
        from transformers import TrainerCallback

        class Clock(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                ends.append(time.perf_counter())

        callbacks.append(Clock())
    dtype = spec.get("dtype", "bfloat16")
    if "model_dir" in spec:
        model = LlamaForCausalLM.from_pretrained(spec["model_dir"], dtype=getattr(torch, dtype))
    else:
        model = _common.build_model(spec.get("size", "100M"), seed=0, dtype=dtype)
    blocks, seq_len = spec.get("blocks", 16), spec.get("seq_len", _common.SEQ_LEN)
    data = _common.TokenDataset(n=blocks, seq_len=seq_len, vocab=model.config.vocab_size)
    baseline = peak_rss_bytes()
    with tempfile.TemporaryDirectory() as out:
        args = _common.training_args(
            out,
            max_steps=spec.get("steps", 3),
            per_device_train_batch_size=spec.get("batch", 4),
            **spec.get("args", {}),
        )
        if "trainer" in spec:
            trainer = _function(spec["trainer"])(model, args, data)
        else:
            trainer = optiplug.OptiTrainer(model=model, args=args, train_dataset=data, optimizer=spec["optimizer"])
        for callback in callbacks:
            trainer.add_callback(callback)
        if spec.get("quiet"):
            with _common.quiet():
                trainer.train()
        else:
            trainer.train()
    cfg = getattr(trainer, "optimizer_config", None)
    if "state" in spec:
        state = _function(spec["state"])(trainer)
    else:
        state = optiplug.optimizer_state_bytes(optiplug.unwrap_optimizer(trainer.optimizer))
    formula = None if cfg is None else optiplug.get_entry(cfg.name).state_bytes
    analytic = None
    if "analytic" in spec:
        analytic = int(_function(spec["analytic"])(model, cfg))
    elif formula is not None:
        analytic = int(formula(optiplug.ParamShape.of_model(model), cfg))
    return {
        "after_imports": after_imports,
        "baseline": baseline,
        "peak": peak_rss_bytes(),
        "state": state,
        "analytic": analytic,
        "params": sum(p.numel() for p in model.parameters()),
        "grad_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "layerwise": optiplug.layerwise_stepper(trainer.optimizer) is not None,
        "steps_per_s": (len(ends) - 1) / (ends[-1] - ends[0]) if len(ends) > 1 else None,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }


def run(spec: dict[str, Any], label: str, timeout: float = 900) -> _common.ChildRun:
    """:func:`measure` of ``spec`` in a fresh process (``python benchmarks/_child.py SPEC``); exits with the
    child's output tail when it fails."""
    child = _common.run_child([sys.executable, __file__, json.dumps(spec)], timeout=timeout)
    if child.returncode != 0 or not isinstance(child.result, dict):
        raise SystemExit(f"{label} failed:\n{child.output[-3000:]}")
    return child


def memory_row(label: str, child: _common.ChildRun) -> dict[str, Any]:
    """The columns every memory benchmark reports of a run: its process's peak (``wait4``), the baseline after
    building the model, what training added above it, and the optimizer state, in MiB."""
    peak, baseline = child.peak_rss_bytes or 0, child.result["baseline"]
    return {
        "run": label,
        "peak_rss_mib": _common.mib(peak),
        "baseline_mib": _common.mib(baseline),
        "training_added_mib": _common.mib(peak - baseline),
        "optimizer_state_mib": _common.mib(child.result["state"]),
    }


def versus_first(rows: list[dict[str, Any]]) -> None:
    """Add ``peak_vs_adamw`` and ``added_vs_adamw`` to each of :func:`memory_row`'s ``rows``: over the first's (AdamW)."""
    reference = rows[0]
    for row in rows:
        row["peak_vs_adamw"] = round(row["peak_rss_mib"] / reference["peak_rss_mib"], 3)
        row["added_vs_adamw"] = round(row["training_added_mib"] / reference["training_added_mib"], 3)


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
