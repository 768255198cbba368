"""Step time of ``badam`` (layer mode) vs fused ``adamw``, the plugin vs LLaMA-Factory's wiring, and the block-switch cost.

The ``27M`` model in float32, three copies from one seed, each with its optimizer: fused AdamW
(``adamw``), the plugin's ``badam`` and badam's ``BlockOptimizer`` wired as LLaMA-Factory does
(the reference), both switching every 2 steps in ascending order (8 blocks). A plain loop
(forward, backward, step, zero_grad; no clipping) runs two full rounds of the blocks per
optimizer, the three taking turns one block (2 steps) at a time so that load drifts hit all
alike. Step times include the switches, as a run pays them.

BAdam's backward is cheaper: frozen layers compute no weight gradients, and nothing below the
active block needs a backward at all. The block-switch cost is timed on its own (8 switches per
optimizer, alternating): the reference's switch runs ``gc.collect()`` (timed separately) and
clones float32 weights into float32 master copies; the plugin's does neither. torch runs on one
thread, which keeps a shared machine's load from multiplying into thread contention.
"""

from __future__ import annotations

import gc
import statistics
import time

import _badam
import _common

SIZE = "27M"
BATCH, SEQ = 2, 128
SWITCH_EVERY = 2
ROUNDS = 2
LR = 1e-4


class Candidate:
    """One model copy with its optimizer; records step times, time spent in block switches, losses and state."""

    def __init__(self, name: str, build, extra_state=lambda optimizer: 0):
        import torch

        self.name = name
        self.model = _badam.build_model(SIZE, "float32", seed=0)
        with _common.quiet():
            self.optimizer = build(self.model)
        self.extra_state = extra_state
        self.ids = torch.randint(0, 2048, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
        self.times: list[float] = []
        self.switch_times: list[float] = []
        self.losses: list[float] = []
        self.state_bytes = 0
        self._switching = 0.0
        switch = getattr(self.optimizer, "switch_trainable_params", None)
        if switch is not None:

            def timed_switch(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return switch(*args, **kwargs)
                finally:
                    self._switching += time.perf_counter() - start

            self.optimizer.switch_trainable_params = timed_switch

    def steps(self, n: int) -> None:
        from optiplug import optimizer_state_bytes

        for _ in range(n):
            self._switching = 0.0
            start = time.perf_counter()
            loss = self.model(input_ids=self.ids, labels=self.ids).loss
            loss.backward()
            with _common.quiet():
                self.optimizer.step()
            self.optimizer.zero_grad()
            self.times.append(time.perf_counter() - start)
            self.switch_times.append(self._switching)
            self.losses.append(loss.item())
            self.state_bytes = max(
                self.state_bytes, optimizer_state_bytes(self.optimizer) + self.extra_state(self.optimizer)
            )


def main() -> None:
    import torch

    import optiplug

    torch.set_num_threads(1)
    args = _common.training_args("/tmp/optiplug-badam-bench", learning_rate=LR)
    builders = {
        "adamw (fused)": lambda m: optiplug.build_optimizer(m, {"name": "adamw", "lr": LR, "implementation": "fused"}),
        "badam (optiplug-badam)": lambda m: optiplug.build_optimizer(
            m, {"name": "badam", "lr": LR, "switch_every": SWITCH_EVERY, "switch_mode": "ascending"}
        ),
        "badam (LLaMA-Factory wiring)": lambda m: _badam.reference_optimizer(m, args, SWITCH_EVERY, "ascending"),
    }
    from optiplug import tensor_bytes

    copies = {"badam (LLaMA-Factory wiring)": lambda opt: tensor_bytes(list(opt.param_idx2hp.values()))}
    candidates = [Candidate(name, build, copies.get(name, lambda opt: 0)) for name, build in builders.items()]
    for c in candidates:  # warm-up: one step each (badam's first block has SWITCH_EVERY - 1 steps)
        c.steps(SWITCH_EVERY - 1)
        c.times.clear()
        c.switch_times.clear()
    blocks = 8
    for chunk in range(ROUNDS * blocks):
        for c in candidates if chunk % 2 == 0 else reversed(candidates):
            c.steps(SWITCH_EVERY)
    plugin_losses = candidates[1].losses
    same_losses = plugin_losses == candidates[2].losses

    # The switch on its own, alternating plugin and reference; gc.collect timed inside the reference's.
    collect = gc.collect
    gc_seconds: list[float] = []

    def timed_collect(*a):
        start = time.perf_counter()
        result = collect(*a)
        gc_seconds.append(time.perf_counter() - start)
        return result

    switch = {"badam (optiplug-badam)": [], "badam (LLaMA-Factory wiring)": []}
    gc_in_reference: list[float] = []
    models = {name: _badam.build_model(SIZE, "float32", seed=0) for name in switch}
    with _common.quiet():
        optimizers = {name: builders[name](models[name]) for name in switch}
    gc.collect = timed_collect
    try:
        for i in range(2 * blocks):
            for name in switch if i % 2 == 0 else reversed(list(switch)):
                gc_seconds.clear()
                start = time.perf_counter()
                with _common.quiet():
                    optimizers[name].switch_trainable_params()
                switch[name].append(time.perf_counter() - start)
                if name.endswith("wiring)"):
                    gc_in_reference.append(sum(gc_seconds))
    finally:
        gc.collect = collect

    adamw_mean = statistics.fmean(candidates[0].times)
    reference_mean = statistics.fmean(candidates[2].times)
    rows = []
    for c in candidates:
        mean = statistics.fmean(c.times)
        rows.append({
            "optimizer": c.name,
            "steps_timed": len(c.times),
            "mean_step_s": round(mean, 4),
            "median_step_s": round(statistics.median(c.times), 4),
            "mean_step_without_switches_s": round(statistics.fmean(t - w for t, w in zip(c.times, c.switch_times)), 4),
            "vs_adamw": round(mean / adamw_mean, 3),
            "vs_reference": round(mean / reference_mean, 3) if c.name != candidates[0].name else None,
            "switch_ms_median": round(1000 * statistics.median(switch[c.name]), 2) if c.name in switch else None,
            "gc_collect_ms_median": round(1000 * statistics.median(gc_in_reference), 2) if c.name.endswith("wiring)") else (0.0 if c.name in switch else None),
            "peak_state_mib": _common.mib(c.state_bytes),
        })  # fmt: skip
    badam_vs_adamw = rows[1]["vs_adamw"]
    compute_only = round(rows[1]["mean_step_without_switches_s"] / rows[0]["mean_step_without_switches_s"], 3)
    reference_vs_adamw = rows[2]["vs_adamw"]
    plugin_vs_reference = rows[1]["vs_reference"]
    switch_ratio = round(
        statistics.median(switch[candidates[1].name]) / statistics.median(switch[candidates[2].name]), 4
    )
    print(rows, same_losses, switch_ratio, flush=True)
    _common.write_results(
        _common.script_name(__file__),
        "BAdam step time: badam vs fused adamw, plugin vs LLaMA-Factory wiring, block-switch cost",
        rows,
        notes=(
            f"Model {SIZE} ({_common.MODEL_SIZES[SIZE].describe()}) in float32, batch {BATCH} x {SEQ} tokens, one "
            f"torch thread; {ROUNDS} rounds of all 8 blocks (switch every {SWITCH_EVERY} steps, ascending) per "
            "optimizer, taking turns a block at a time; step times include the switches. Mean step time "
            f"badam / adamw = {badam_vs_adamw} (reference wiring: {reference_vs_adamw}; without the time spent in "
            f"switches: {compute_only}); plugin / reference = {plugin_vs_reference} (target <= 1.0). Switch cost "
            f"(median of {2 * blocks} switches each): plugin / reference = {switch_ratio}; the reference's gc.collect() "
            f"takes {rows[2]['gc_collect_ms_median']} ms of its {rows[2]['switch_ms_median']} ms. Peak optimizer state: "
            f"plugin {rows[1]['peak_state_mib']} MiB, reference {rows[2]['peak_state_mib']} MiB (its float32 copy of "
            f"float32 weights), adamw {rows[0]['peak_state_mib']} MiB. "
            f"Plugin and reference losses identical at every step: {same_losses}."
        ),
        targets={
            "plugin_vs_reference_step_time": {
                "target": "<= 1.0",
                "value": plugin_vs_reference,
                "met": plugin_vs_reference <= 1.0,
            },
            "same_losses_as_reference": {"target": "identical", "value": same_losses, "met": same_losses},
        },
        chart={"x": "optimizer", "y": ["mean_step_s"], "kind": "bar", "ylabel": "seconds per step"},
        machine=_common.machine(),
        badam_vs_adamw=badam_vs_adamw,
        badam_vs_adamw_without_switches=compute_only,
        switch_cost_plugin_vs_reference=switch_ratio,
    )


if __name__ == "__main__":
    main()
