"""Optimizer-state bytes of ``badam`` (layer mode) vs ``adamw`` on the same model, measured next to the analytic value.

The ``27M`` model (8 decoder layers, so 8 blocks), in float32 and in bfloat16. For every
optimizer the state is measured after a step by summing the tensors of its state
(``optiplug.optimizer_state_bytes``: every tensor in ``state_dict()["state"]``); BAdam
is measured on every block in turn and its largest block is reported. Next to it:

* ``analytic``: the entry's ``state_bytes`` (what ``optiplug estimate`` shows);
* ``formula``: AdamW's float32 state of the decoder layers / number of blocks, plus the float32
  copy of the active block where the weights are not float32 (moments are float32 either way:
  they belong to the float32 master weights);
* the reference: badam's ``BlockOptimizer`` wired as LLaMA-Factory does; its state_dict leaves
  out its float32 copies, so they are added from the optimizer.

Measured must equal analytic for every row the plugin computes. By default BAdam trains the
decoder layers only (embedding, final norm and head stay frozen), so AdamW's state covers more
parameters than all of BAdam's blocks together.
"""

from __future__ import annotations

import _badam
import _common

SIZE = "27M"
BATCH, SEQ = 1, 32


def one_step(model, optimizer, step) -> None:
    import torch

    ids = torch.randint(0, 2048, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    step()
    optimizer.zero_grad()


def per_block(model, optimizer, extra=lambda opt: 0) -> list[int]:
    """State bytes after a step on each block (stepping without badam's own switch, then switching)."""
    from optiplug import optimizer_state_bytes

    sizes = []
    for _ in range(optimizer.block_num):
        one_step(model, optimizer, optimizer.step_single_gpu)
        sizes.append(optimizer_state_bytes(optimizer) + extra(optimizer))
        with _common.quiet():
            optimizer.switch_trainable_params()
    return sizes


def main() -> None:
    import torch

    import optiplug
    from optiplug import optimizer_state_bytes, tensor_bytes

    torch.set_num_threads(1)
    adamw_entry, badam_entry = optiplug.get_entry("adamw"), optiplug.get_entry("badam")
    rows = []
    for dtype in ("float32", "bfloat16"):
        model = _badam.build_model(SIZE, dtype)
        shapes = optiplug.ParamShape.of_model(model)
        layers = [s for s in shapes if ".layers." in s.name]
        blocks = len({s.name.split(".layers.")[1].split(".")[0] for s in layers})
        adamw_cfg = optiplug.parse_optimizer("adamw")
        badam_cfg = optiplug.parse_optimizer({"name": "badam", "switch_every": -1})

        adamw = optiplug.build_optimizer(model, adamw_cfg)
        one_step(model, adamw, adamw.step)
        adamw_measured = optimizer_state_bytes(adamw)
        del adamw

        float32_adamw_layers = sum(2 * 4 * s.numel + 4 for s in layers)
        block_numel = sum(s.numel for s in layers) // blocks
        copy = 4 * block_numel
        formula = float32_adamw_layers // blocks + (copy if dtype != "float32" else 0)

        model = _badam.build_model(SIZE, dtype)
        with _common.quiet():
            plugin = optiplug.build_optimizer(model, badam_cfg)
        plugin_sizes = per_block(model, plugin)
        del plugin

        model = _badam.build_model(SIZE, dtype)
        reference = _badam.reference_optimizer(
            model, _common.training_args("/tmp/optiplug-badam-bench"), switch_every=10**9
        )
        reference_sizes = per_block(model, reference, lambda opt: tensor_bytes(list(opt.param_idx2hp.values())))
        del reference, model

        analytic = {
            "adamw": adamw_entry.state_bytes(shapes, adamw_cfg),
            "badam": badam_entry.state_bytes(shapes, badam_cfg),
        }
        plugin_bytes, reference_bytes = max(plugin_sizes), max(reference_sizes)
        for name, measured, expected, form in (
            ("adamw", adamw_measured, analytic["adamw"], None),
            ("badam (optiplug-badam)", plugin_bytes, analytic["badam"], formula),
            ("badam (LLaMA-Factory wiring)", reference_bytes, None, float32_adamw_layers // blocks + copy),
        ):
            rows.append({
                "dtype": dtype,
                "optimizer": name,
                "measured_mib": _common.mib(measured),
                "measured_bytes": measured,
                "analytic_bytes": expected,
                "formula_bytes": form,
                "measured_equals_analytic": None if expected is None else measured == expected,
                "vs_adamw": round(measured / adamw_measured, 4),
                "vs_plugin": round(measured / plugin_bytes, 4),
                "blocks_measured": 1 if name == "adamw" else blocks,
            })  # fmt: skip
        print(f"{dtype}: adamw {adamw_measured}, plugin {plugin_sizes}, reference {reference_sizes}", flush=True)

    all_equal = all(r["measured_equals_analytic"] for r in rows if r["measured_equals_analytic"] is not None)
    f32 = {r["optimizer"]: r for r in rows if r["dtype"] == "float32"}
    ref_over_plugin_f32 = f32["badam (LLaMA-Factory wiring)"]["vs_plugin"]
    _common.write_results(
        _common.script_name(__file__),
        "BAdam optimizer state: measured vs analytic, vs AdamW and vs the LLaMA-Factory wiring",
        rows,
        notes=(
            f"Model {SIZE} ({_common.MODEL_SIZES[SIZE].describe()}), 8 blocks (one per decoder layer; embedding, "
            "final norm and head frozen, badam's default). Measured = tensors in state_dict()['state'] after a step, "
            "largest block; the reference's float32 copies (not in its state_dict) are added. Formula = AdamW's "
            "float32 state of the layers / blocks (+ float32 copy of a block for bfloat16 weights; the reference "
            f"always keeps the copy). Measured == analytic for every plugin and adamw row: {all_equal}. With float32 "
            f"weights the reference holds {ref_over_plugin_f32}x the plugin's state (its float32 copy of float32 "
            "weights). AdamW on bfloat16 weights keeps bfloat16 moments, BAdam float32 ones (on its float32 master copy)."
        ),
        targets={
            "measured_equals_analytic": {"target": "== analytic for every row", "value": all_equal, "met": all_equal},
        },
        machine=_common.machine(),
    )


if __name__ == "__main__":
    main()
