"""The optimizers of pytorch-optimizer's registry that the bridge does not register, and why.

Each one cannot train in a standard ``transformers.Trainer`` step (one forward, one
``loss.backward()``, one ``optimizer.step()`` without arguments), or cannot resume from a
checkpoint read with ``torch.load(weights_only=True)``. Importing this module imports nothing heavy.
"""

from __future__ import annotations

__all__ = ["LEFT_OUT"]

CLOSURE = "needs a closure: its step() re-evaluates the loss, and the Trainer calls step() without one"
SECOND_BACKWARD = (
    "needs a second backward pass: its Hessian-vector products need loss.backward(create_graph=True), "
    "which the Trainer does not do"
)
FUSED_BACKWARD = (
    "replaces the backward pass: it updates the weights inside optimizer.fused_backward(loss, lr) and its step() "
    "raises NotImplementedError"
)
OBJECTS_IN_STATE = (
    "keeps Python objects in its state ({what}), which torch.load(weights_only=True) refuses, so no checkpoint "
    "of it can be resumed"
)

ZERO_LR = (
    "divides by the learning rate {where}: the warmup of optiplug's and transformers' schedules starts at a "
    "learning rate of 0, so step 1 fails"
)

LEFT_OUT: dict[str, str] = {
    "lbfgs": CLOSURE + " (it runs several line-search evaluations per step) and takes a single parameter group",
    "alig": CLOSURE + " (it needs the loss value to compute its step size)",
    "bsam": CLOSURE + " (a SAM variant: two forward-backward passes per step) and needs the data set size",
    "adahessian": SECOND_BACKWARD,
    "sophiah": SECOND_BACKWARD,
    "lomo": FUSED_BACKWARD,
    "adalomo": FUSED_BACKWARD,
    "demo": (
        "needs an initialised torch.distributed process group (it exchanges compressed momenta), even on one process"
    ),
    "adammini": (
        "takes the model and its hidden size and head counts, not parameters: use optiplug-adam-mini "
        "(optimizer name adam_mini), which reads them from the model's config"
    ),
    "lorarite": "needs LoRA factor pairs handed over in its own parameter layout; it fails on any other model",
    "asgd": ZERO_LR.format(where="at every step (it adapts the rate itself and a schedule overwrites it)"),
    "gravity": ZERO_LR.format(where="when it creates its state"),
    "ftrl": ZERO_LR.format(where="(through lr ** lr_power), giving NaN weights").replace(
        "step 1 fails", "step 1 is NaN"
    ),
    "distributedmuon": (
        "needs an initialised torch.distributed process group at construction; on one process it is po_muon, "
        "and the bridge does not test it across processes"
    ),
    "muonclip": (
        "needs extra inputs at every step (the attention's per-head maximum logits, step(attention_max_logits=...)) "
        "and attention groups labelled by hand; the Trainer passes neither, and without them it clips nothing "
        "(po_muon does the rest)"
    ),
}
"""registry name in pytorch-optimizer -> why the bridge leaves it out."""
