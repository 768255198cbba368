"""Which bridged optimizers train on sharded parameters: elementwise ones do, the others are refused.

DeepSpeed ZeRO hands the optimizer flat 1-D partitions of the weights, cut at arbitrary elements,
one optimizer per process; FSDP2 hands it DTensor row shards; FSDP version 1 flat 1-D parameters.
An optimizer whose step reads each element's own gradient and state only (and scalars every process
computes alike: the step count, the learning rate, a loss-driven scalar when no loss is passed)
takes the same step on any piece of a tensor as on the whole: it is **elementwise** and trains under
every engine. An optimizer that reads across a tensor's elements (a norm, a mean over rows, a
matrix decomposition, a sum over all its weights, a random mask over a matrix) would compute on a
piece what it defines on the whole: it is refused under DeepSpeed and FSDP, with what it reads, and
trains with DDP or in one process.

The classification comes from pytorch-optimizer's sources (version in the catalogue); the catalogue
test checks it against the optimizers themselves: every elementwise optimizer takes, on a tensor's
two halves stepped by two separate optimizers (as two processes would), the steps it takes on the
whole tensor, and the refused ones (those whose cross-element reading shows on a small tensor in a
few steps) do not. Some elementwise optimizers read across elements when a field or a per-group
option (``optimizer.param_groups`` extras) turns a feature on: those settings are refused the same
way. None of the refused optimizers is routed through the core's sharded matrix step: the
whole-matrix ones with a sharded counterpart in optiplug (Muon's family, GaLore, APOLLO) name it.
"""

from __future__ import annotations

import functools
from typing import Any

import optiplug
from optiplug_pytorch_optimizer.catalogue import specs

__all__ = [
    "DEEPSPEED_ONLY",
    "ELEMENTWISE",
    "FIELD_OPTIONS",
    "FOREACH_NOT_ON_DTENSOR",
    "GROUP_OPTIONS",
    "INSTEAD",
    "WHOLE_TENSOR",
    "check",
    "reads_across",
    "step_only_groups_with_parameters",
]

_MUON = "Newton–Schulz orthogonalization of each weight matrix (Muon's family)"
_DADAPT = "D-Adaptation's step-size estimate, sums over all its weights"
_SHAMPOO = "Shampoo's preconditioners: inverse roots of each matrix's row and column statistics"
_PROJECTION = "projections that drop the radial part by each weight's cosine similarity to its gradient"
_CORRELATION = "the correlation of each tensor's momentum with its gradient, a sum over the tensor"
_SCION = "a linear minimization oracle over each matrix's norm ball (spectral: Newton–Schulz)"

ELEMENTWISE: frozenset[str] = frozenset(
    {
        "accsgd", "adabelief", "adabound", "adadelta", "adam", "adamax", "adamc", "adamg", "adamod", "adamw",
        "adamwsn", "adan", "adapnm", "adasmooth", "ademamix", "adopt", "aggmo", "ano", "apollo", "bcos", "diffgrad",
        "dualadam", "emolynx", "emonavi", "exadam", "fira", "focus", "galore", "grams", "grokfastadamw", "kate",
        "laprop", "lion", "madgrad", "msvag", "nadam", "padam", "pid", "pnm", "qhadam", "qhm", "radam", "rmsprop",
        "schedulefreeadamw", "schedulefreeradam", "schedulefreesgd", "sgd", "sgdw", "signsgd", "simplifiedademamix",
        "srmm", "tiger", "vsgd", "yogi",
    }
)  # fmt: skip
"""pytorch-optimizer names whose step is elementwise at the bridge's settings (see the module)."""

WHOLE_TENSOR: dict[str, str] = {
    "a2grad": "per-tensor sums of its gradient deviations (v_k)",
    "adafactor": "factored second moments (row and column means of each matrix) and each weight's RMS",
    "adagc": "clipping by each tensor's gradient norm (its adaptive gamma)",
    "adago": _MUON,
    "adai": "the mean second moment over all its weights, which sets every weight's momentum",
    "adalite": "row and column statistics of each matrix (factored moments, softmax importance weights)",
    "adamp": _PROJECTION,
    "adams": "stable weight decay: the mean second moment over all its weights",
    "adamuon": _MUON,
    "adanorm": "a running average of each tensor's gradient norm, which rescales its gradient",
    "adashift": "the maximum over each tensor of its delayed squared gradient (reduce_func: torch.max)",
    "adatam": _CORRELATION,
    "aida": "projections of each tensor's gradient and momentum onto each other, sums over the tensor",
    "alice": "a low-rank subspace of each matrix (QR and eigendecompositions)",
    "amos": "the mean squared gradient of each tensor, and a target scale from its shape",
    "apollodqn": "a diagonal Hessian approximation updated with sums and a 4-norm over each tensor",
    "avagrad": "a step size from the norm of its inverse preconditioner over all its weights",
    "came": "factored row and column moments of each matrix, and clipping by each tensor's RMS",
    "conda": "a projection of each matrix's update onto a subspace of its momentum (an SVD of each 2-D weight)",
    "dadaptadagrad": _DADAPT,
    "dadaptadam": _DADAPT,
    "dadaptadan": _DADAPT,
    "dadaptlion": _DADAPT,
    "dadaptsgd": _DADAPT,
    "dash": "Shampoo-style block preconditioners of each matrix (inverse roots)",
    "emofact": "factored row and column moments of each matrix",
    "fadam": "clipping by the RMS of each tensor's natural gradient and update",
    "flashadamw": "8-bit states quantized in groups of 32 consecutive elements, each group with one scale",
    "fromage": "each weight's norm and its gradient's norm",
    "kron": "Kronecker-factored preconditioners of each matrix (PSGD)",
    "lamb": "the trust ratio: each weight's norm over its update's norm",
    "lars": "the trust ratio: each weight's norm over its gradient's norm",
    "magma": "the cosine between each tensor's momentum and gradient, and random block masks",
    "mars": "clipping by the norm of each tensor's corrected gradient",
    "muon": _MUON,
    "nero": "the norm of each neuron (row) of a weight, and their mean",
    "normuon": f"{_MUON} and per-neuron normalization",
    "novograd": "one second moment per tensor: its gradient's squared norm",
    "prodigy": "Prodigy's step-size estimate, sums over all its weights",
    "racs": "row and column scaling statistics of each matrix",
    "ranger": "gradient centralization: the mean over each weight's other dimensions",
    "ranger21": "gradient centralization, clipping by unit norms and a norm loss from each weight's norm",
    "rose": "the minimum, maximum and mean of each tensor's gradient",
    "sara": "the state of a selection of each weight's entries as one flat vector, gathered by boolean masks over "
    "the whole tensor (and with lambda_rank an SVD of a whole matrix)",
    "scalableshampoo": _SHAMPOO,
    "scion": _SCION,
    "scionlight": _SCION,
    "sgdp": _PROJECTION,
    "sgdsai": "a step size per tensor from its gradient's signal-to-noise ratio (norm and standard deviation)",
    "shampoo": _SHAMPOO,
    "sm3": "cover-set accumulators: maxima along each dimension of a tensor",
    "soap": "eigenbases of each matrix's row and column statistics (Adam in Shampoo's basis)",
    "spam": "random sparse update masks over each whole matrix, with the state of the masked entries as a flat vector",
    "spectralsphere": "the spectral norm of each matrix (2-D weights only)",
    "splus": "eigendecompositions of each matrix's row and column statistics",
    "stableadamw": "update clipping by each tensor's RMS ratio of gradient to second moment",
    "stablespam": "each tensor's largest gradient and gradient norm (adaptive clipping)",
    "swats": "dot products over each tensor that decide when it switches from Adam to SGD, and SGD's learning rate",
    "tam": _CORRELATION,
}
"""pytorch-optimizer names whose step reads across a tensor's elements, with what it reads (from its source)."""

FIELD_OPTIONS: dict[str, dict[str, str]] = {
    "adan": {"max_grad_norm": "clipping by the gradient norm over all its weights (max_grad_norm above 0)"},
}
"""Config fields that make an elementwise optimizer read across elements when not at their default (0)."""

_RANK = "low-rank projections of each matrix (rank in optimizer.param_groups)"
GROUP_OPTIONS: dict[str, str] = {
    "adanorm": "a running average of each tensor's gradient norm (adanorm in optimizer.param_groups)",
    "cautious": "a mask rescaled by its mean over each tensor (cautious in optimizer.param_groups)",
    "use_gc": "gradient centralization: means over each weight (use_gc in optimizer.param_groups)",
    "stable_adamw": "update clipping by each tensor's RMS (stable_adamw in optimizer.param_groups)",
    "sn": "subset norms over groups of each tensor's elements (sn in optimizer.param_groups)",
    "rank": _RANK,
}
"""Per-group options (``optimizer.param_groups`` extras) that pytorch-optimizer's steps read, and what they turn on."""

_SWITCH = (
    "its train/eval switch moves the fp32 partitions DeepSpeed steps, not the model's weights, so evaluations and "
    "saved models would be at the training point y, not x: use optiplug's {}, which carries the switch into the weights"
)
DEEPSPEED_ONLY: dict[str, str] = {
    "madgrad": "it keeps one step count for all its parameter groups (state['k']), and DeepSpeed ZeRO steps the "
    "optimizer once per group, so every step would count once per group: train with FSDP2, DDP or a single process",
    "schedulefreeadamw": _SWITCH.format("schedule_free_adamw"),
    "schedulefreeradam": _SWITCH.format("schedule_free_radam"),
    "schedulefreesgd": _SWITCH.format("schedule_free_sgd"),
}
"""Elementwise optimizers refused under DeepSpeed all the same, and why (after "under DeepSpeed")."""

FOREACH_NOT_ON_DTENSOR: dict[str, str] = {
    "adan": "_foreach_copy_",
    "adasmooth": "_foreach_copy_",
    "adopt": "_foreach_maximum_",
    "diffgrad": "_foreach_copy_",
    "madgrad": "_foreach_addcdiv",
    "srmm": "_foreach_copy_",
}
"""Elementwise optimizers whose batched (foreach) step calls an operator DTensor has no sharding rule for (torch
2.13; measured on a fully_shard-ed model): under FSDP the bridge builds them with ``foreach=False`` (their
per-tensor step), and refuses ``foreach: true``."""

INSTEAD: dict[str, str] = {
    "muon": "optiplug's muon (it trains under FSDP2 and DeepSpeed), DDP or a single process",
    "adamuon": "optiplug's muon (it trains under FSDP2 and DeepSpeed), DDP or a single process",
    "normuon": "optiplug's muon (it trains under FSDP2 and DeepSpeed), DDP or a single process",
    "adago": "optiplug's muon (it trains under FSDP2 and DeepSpeed), DDP or a single process",
    "galore": "optiplug's galore_adamw (it trains under FSDP2), DDP or a single process",
    "apollo": "optiplug's apollo_adamw (it trains under FSDP2), DDP or a single process",
}
"""What to train with instead, where optiplug has a sharded counterpart."""


def reads_across(source: str, cfg: Any = None) -> str | None:
    """What pytorch-optimizer's ``source`` reads across a tensor's elements at ``cfg`` (None: elementwise)."""
    if source in WHOLE_TENSOR:
        return WHOLE_TENSOR[source]
    for field, what in FIELD_OPTIONS.get(source, {}).items():
        if cfg is not None and getattr(cfg, field, None):
            return what
    rules = getattr(cfg, "param_groups", ())
    extras = {key for rule in rules for key, value in (rule.model_extra or {}).items() if value}
    return next((what for key, what in GROUP_OPTIONS.items() if key in extras), None)


def check(ctx: optiplug.BuildContext, cfg: Any) -> None:
    """Refuse, under DeepSpeed and FSDP, an optimizer (or a setting) whose step reads across a tensor's elements."""
    if ctx.distributed not in ("deepspeed", "fsdp"):
        return
    source = specs()[cfg.name].source
    if ctx.distributed == "deepspeed" and source in DEEPSPEED_ONLY:
        raise optiplug.ConfigError(f"{cfg.name}: under DeepSpeed {DEEPSPEED_ONLY[source]}")
    if ctx.distributed == "fsdp" and source in FOREACH_NOT_ON_DTENSOR and getattr(cfg, "foreach", None):
        raise optiplug.ConfigError(
            f"{cfg.name}: its batched step (foreach: true) calls torch.{FOREACH_NOT_ON_DTENSOR[source]}, which FSDP's "
            "DTensor parameters do not support: leave optimizer.foreach unset (under FSDP the bridge then takes its "
            "per-tensor step)"
        )
    what = reads_across(source, cfg)
    if what is None:
        return
    optiplug.check_whole_matrices(
        ctx,
        cfg.name,
        f"reads across each weight tensor ({what})",
        fsdp2=False,
        instead=INSTEAD.get(source),
    )


def step_only_groups_with_parameters(optimizer: Any) -> Any:
    """Make ``optimizer.step()`` leave out the parameter groups that hold no parameters (for DeepSpeed).

    DeepSpeed ZeRO-3 steps the optimizer once per group, with that group's fp32 partition in it and the
    other groups' parameter lists empty; most of pytorch-optimizer's optimizers advance every group's
    step count at each call, parameters or not, so each group would count a step once per group (its
    bias corrections and warmups would run ahead). Stepping only the groups that hold parameters takes
    one process's steps (tested for every elementwise optimizer with DeepSpeed's calling patterns).
    """
    step = optimizer.step

    @functools.wraps(step)
    def stepping(closure: Any = None) -> Any:
        groups = optimizer.param_groups
        live = [group for group in groups if group["params"]]
        if len(live) == len(groups):
            return step(closure)
        optimizer.param_groups = live
        try:
            return step(closure)
        finally:
            optimizer.param_groups = groups

    optimizer.step = stepping
    return optimizer
