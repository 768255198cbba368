"""optiplug-pytorch-optimizer: every optimizer of pytorch-optimizer's registry as an optiplug optimizer.

pytorch-optimizer's ``lion`` is ``po_lion`` here (the ``po_`` prefix is the bridge's namespace), with
a config generated from its constructor: ``optiplug show po_lion`` lists its fields, ``optiplug
schema`` includes it. Optimizers that cannot train in a Trainer step are left out
(:data:`optiplug_pytorch_optimizer.left_out.LEFT_OUT` says why). The names and fields come from the
committed ``catalogue.json``, so importing this package (and ``optiplug list``) imports neither
torch nor pytorch-optimizer; the factory does.
"""

from __future__ import annotations

import functools
from typing import Any

import optiplug
from optiplug_pytorch_optimizer import schedulers
from optiplug_pytorch_optimizer.catalogue import PREFIX, Spec, config_class, specs
from optiplug_pytorch_optimizer.left_out import LEFT_OUT

__all__ = ["LEFT_OUT", "NO_ESTIMATE", "PREFIX", "entries", "register_optimizers", "register_schedulers"]
__version__ = "0.1.0"

# Optimizers whose state size the estimate cannot know without training ("n/a" in `optiplug estimate`), and why.
# The others are measured: on meta tensors, or (their step reads values) on stand-ins (factory.STAND_IN_REVIEWED).
NO_ESTIMATE: dict[str, str] = {
    "alice": "low-rank statistics whose size depends on the rank and the weights' shapes, and a step that reads values",
    "nero": "per-neuron state created only for weights whose norm is not zero (a zero-initialised bias has none)",
    "racs": "row and column statistics, and a step that reads values",
    "sara": "state sized by how many entries fall below a threshold (values decide the size)",
    "spectralsphere": "a step that reads values, on 2-D weights only",
    "swats": "a momentum buffer created when it switches from Adam to SGD, which the gradients decide",
}
# Optimizers with a check beyond the sharding one: fields the run must fill in, or parameters they refuse.
CHECKED = {"adai", "ranger21", "spectralsphere", "muon", "adamuon", "adago", "normuon"}


def build(ctx: optiplug.BuildContext, cfg: Any) -> Any:
    """Build the pytorch-optimizer optimizer ``cfg`` names (imports torch and pytorch-optimizer)."""
    from optiplug_pytorch_optimizer.factory import build as build_optimizer

    return build_optimizer(ctx, cfg)


def check(ctx: optiplug.BuildContext, cfg: Any) -> None:
    """Refuse, before the first step, a set-up the optimizer cannot train (sharded engines: see ``sharding``)."""
    from optiplug_pytorch_optimizer import sharding

    sharding.check(ctx, cfg)
    if specs()[cfg.name].source in CHECKED:
        from optiplug_pytorch_optimizer.factory import check as check_optimizer

        check_optimizer(ctx, cfg)


def state_bytes(shapes: Any, cfg: Any) -> int:
    """The optimizer state, measured by stepping the real optimizer on meta tensors (nothing allocated)."""
    from optiplug_pytorch_optimizer.factory import measured_state_bytes

    return measured_state_bytes(shapes, cfg)


def entry(spec: Spec) -> optiplug.OptimizerEntry:
    """The registry entry of one bridged optimizer."""
    return optiplug.OptimizerEntry(
        config=optiplug.LazyConfig(spec.name, functools.partial(config_class, spec)),  # built on first use
        build=build,
        summary=f"{spec.summary} (pytorch-optimizer {spec.source})",
        check=check,
        requires=("pytorch-optimizer",),
        state_bytes=None if spec.source in NO_ESTIMATE else state_bytes,
    )


def entries() -> list[optiplug.OptimizerEntry]:
    """Every bridged optimizer's entry, in name order."""
    return [entry(spec) for spec in specs().values()]


@optiplug.hookimpl
def register_optimizers(register: Any) -> None:
    for item in entries():
        register(item)


@optiplug.hookimpl
def register_schedulers(register: Any) -> None:
    schedulers.register(register)
