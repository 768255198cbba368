"""Helpers for optimizers that treat weight matrices apart (GaLore, APOLLO, Muon, and yours): no torch here.

- :func:`split_param_groups`: the context's groups, each split into the parameters your optimizer
  treats as matrices and the rest; one order for every plugin.
- :func:`check_whole_matrices`: the one refusal of the set-ups a whole-matrix optimizer cannot train
  (DeepSpeed ZeRO's flat partitions, FSDP version 1's flat parameters, PEFT adapters), each with one
  sentence; FSDP2 is allowed when your optimizer runs each matrix's update through
  :class:`optiplug.MatrixOptimizer` (see :mod:`optiplug.sharded`).

The optimizer-side helpers (the per-parameter step, the sharded step) are in :mod:`optiplug.stepping`
and :mod:`optiplug.sharded`; the shapes of low-rank projections in :mod:`optiplug.shapes`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from optiplug.errors import ConfigError, PluginError
from optiplug.params import GROUP_ROLE

if TYPE_CHECKING:
    from optiplug.context import BuildContext, ParamShape
    from optiplug.entries import OptimizerEntry

__all__ = [
    "check_built_for_fsdp2",
    "check_whole_matrices",
    "count_shapes",
    "fsdp_version",
    "split_param_groups",
    "split_shapes",
]


def split_param_groups(
    groups: Sequence[Mapping[str, Any]],
    targeted: Iterable[Any],
    options: Mapping[str, Any] | None = None,
    *,
    roles: tuple[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Split each of ``groups`` into its parameters outside ``targeted`` and those in it.

    The order is fixed, for every plugin: first the untargeted part of each group, then the targeted
    part of each group, each in the order of ``groups`` (transformers' order for GaLore and APOLLO:
    ``[non-target, target]``); empty parts are dropped. Every part keeps its group's keys (the user's
    ``optimizer.param_groups`` options and label); targeted parts also get ``options``.

    Args:
        groups: the groups to split, usually ``ctx.param_groups(weight_decay)``.
        targeted: the parameters (tensors, compared by identity) your optimizer treats as matrices.
        options: keys added to every targeted part (``{"rank": 8, ...}``).
        roles: ``(untargeted, targeted)``: what each kind of part is for, a few words set under
            ``optiplug.GROUP_ROLE`` (``("adamw (not a target)", "galore rank 8")``; ``--dry-run`` prints it).

    Returns:
        New group dicts; ``groups`` is not changed. A checkpoint's optimizer state is keyed by this
        order: keep it once released.
    """
    chosen = {id(param) for param in targeted}
    extra = {False: {}, True: dict(options or {})}
    if roles is not None:
        extra[False][GROUP_ROLE], extra[True][GROUP_ROLE] = roles
    parts: list[dict[str, Any]] = []
    for want in (False, True):
        for group in groups:
            params = [param for param in group["params"] if (id(param) in chosen) == want]
            if params:
                parts.append({**group, "params": params, **extra[want]})
    return parts


def fsdp_version(ctx: BuildContext) -> int | None:
    """The FSDP version the run uses (1: flat parameters, 2: ``fully_shard``'s DTensor parameters), None without FSDP.

    Inside a Trainer it is what accelerate's FSDP plugin says; otherwise ``fsdp_config.version``
    (transformers' default: 2); a model whose parameters are already DTensors is FSDP2.
    """
    if ctx.distributed != "fsdp":
        return None
    plugin = getattr(getattr(getattr(ctx.trainer, "accelerator", None), "state", None), "fsdp_plugin", None)
    if plugin is not None and getattr(plugin, "fsdp_version", None):
        return int(plugin.fsdp_version)
    if any(type(p).__name__ == "DTensor" for _, p in ctx.named_parameters()):
        return 2
    config = getattr(ctx.args, "fsdp_config", None) or {}
    return int(config.get("version", config.get("fsdp_version", 2))) if isinstance(config, Mapping) else 2


def check_whole_matrices(
    ctx: BuildContext,
    name: str,
    does: str,
    *,
    fsdp2: bool = True,
    adapters: str | None = None,
    instead: str | None = None,
) -> None:
    """Refuse, with one sentence, the set-ups where an optimizer that needs whole weight matrices cannot train.

    Call it from your entry's ``check``. It refuses:

    - DeepSpeed (any ZeRO stage): the optimizer steps flattened 1-D partitions, which cut matrices
      at arbitrary elements, so no matrix reaches it whole;
    - FSDP version 1: it flattens the parameters of each unit into one 1-D tensor;
    - FSDP2 when ``fsdp2`` is False (your optimizer does not step matrices through
      :class:`optiplug.MatrixOptimizer`): each process holds row shards of every matrix;
    - a PEFT adapter model (whose trainable weights are already low-rank), unless ``adapters`` is
      None: then adapters are allowed.

    Args:
        ctx: the build context.
        name: the optimizer's name, the sentence's subject.
        does: what the optimizer does with a matrix, after the name ("projects whole weight matrices").
        fsdp2: True when the optimizer trains FSDP2's DTensor parameters through the core's sharded step.
        adapters: what the optimizer does that adapters defeat, after the name ("trains full weight
            matrices through low-rank projections"), or None to allow adapters.
        instead: what to train with instead, ending the sentence (default: FSDP2, DDP or a single
            process; without ``fsdp2``, DDP or a single process).

    Raises:
        ConfigError: one of the above, saying what to train with instead.
    """
    engine = ctx.distributed
    if instead is None:
        instead = "FSDP2 (fsdp_config.version: 2), DDP or a single process" if fsdp2 else "DDP or a single process"
    if engine == "deepspeed":
        stage = ctx.deepspeed_stage
        raise ConfigError(
            f"{name} {does}, and DeepSpeed (ZeRO stage {stage}) hands the optimizer flattened 1-D partitions of "
            f"the weights, cut at arbitrary elements; train with {instead}"
        )
    if engine == "fsdp":
        version = fsdp_version(ctx)
        if version == 1:
            raise ConfigError(
                f"{name} {does}, and FSDP version 1 flattens each unit's weights into one 1-D parameter; "
                f"train with {instead}"
            )
        if not fsdp2:
            raise ConfigError(
                f"{name} {does}, which FSDP splits into row shards across the processes; train with {instead}"
            )
    if adapters is not None and ctx.uses_adapters:
        raise ConfigError(
            f"{name} {adapters}, and the model is a PEFT adapter model whose trainable weights are already "
            f"low-rank; use adamw for adapters"
        )


def split_shapes(shapes: Sequence[ParamShape], names: Iterable[str]) -> tuple[list[ParamShape], list[ParamShape]]:
    """``(those named in names, the others)`` of ``shapes``, each in order (names: ``optiplug.target_shapes``)."""
    chosen = set(names)
    return [s for s in shapes if s.name in chosen], [s for s in shapes if s.name not in chosen]


def count_shapes(shapes: Sequence[ParamShape], one: str = "tensor", many: str = "tensors") -> str:
    """``"14 matrices (0.43M parameters)"``: how many of ``shapes`` and their size, for an entry's ``describe``."""
    numel = sum(s.numel for s in shapes)
    return f"{len(shapes)} {one if len(shapes) == 1 else many} ({numel / 1e6:.2f}M parameters)"


def check_built_for_fsdp2(entry: OptimizerEntry, optimizer: Any, ctx: BuildContext) -> None:
    """After ``build``: under FSDP2 a ``whole_matrices`` entry must have built an ``optiplug.MatrixOptimizer``.

    Anything else would run its whole-matrix update on each process's row shards, silently. The core
    calls it on what every entry's ``build`` returns.

    Raises:
        PluginError: naming the entry and the class it built.
    """
    if not getattr(entry, "whole_matrices", False) or fsdp_version(ctx) != 2:
        return
    from optiplug.stepping import MatrixOptimizer
    from optiplug.unwrap import unwrap_optimizer

    built = unwrap_optimizer(optimizer)
    if not isinstance(built, MatrixOptimizer):
        raise PluginError(
            f"optimizer {entry.name!r} declares whole_matrices=True, but its build returned "
            f"{type(built).__name__}, not an optiplug.MatrixOptimizer: under FSDP2 it would update row shards as if "
            f"they were whole matrices; fix the plugin, or train without FSDP2"
        )
