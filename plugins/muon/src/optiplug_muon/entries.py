"""The ``muon`` entry's factory, compatibility check and analytic state size (torch only inside functions)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import optiplug
from optiplug_muon.routing import TRANSPOSED_MODULES, Routing

if TYPE_CHECKING:
    from torch import nn

    from optiplug_muon.config import MuonConfig

# A child of the Trainer's logger: the routing line shows where the Trainer's own info lines do
# (``training.log_level: info``), and in every Python program that enables INFO logging.
logger = logging.getLogger("transformers.trainer.muon")


def _head_names(model: nn.Module) -> set[str]:
    """Qualified names of the output head's parameters (``get_output_embeddings``), when the model has one."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        return set()
    ids = {id(p) for p in head.parameters()}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def routing(ctx: optiplug.BuildContext, cfg: MuonConfig) -> Routing:
    """The split of ``ctx``'s trainable parameters between Muon and AdamW."""
    return Routing.of(optiplug.ParamShape.of_model(ctx.model), cfg.adamw_patterns, _head_names(ctx.model))


def _no_muon_message(route: Routing) -> str:
    return (
        f"muon: no trainable parameter reaches Muon (all {len(route.adamw)} are kept on AdamW: not 2-D, embeddings, "
        "the output head, or matched by optimizer.adamw_patterns); train 2-D weight matrices (full fine-tuning, or "
        "unfreeze the attention/MLP projections), narrow optimizer.adamw_patterns, or use optimizer.name=adamw"
    )


def check(ctx: optiplug.BuildContext, cfg: MuonConfig) -> None:
    """Refuse setups where Muon cannot do what it says, each with one sentence saying what to change.

    Raises:
        optiplug.ConfigError: a LoRA (PEFT) model; FSDP; no parameter routed to Muon; under DeepSpeed, what its
            own Muon cannot honour (:func:`optiplug_muon.deepspeed_check.check_deepspeed`).
    """
    if ctx.uses_adapters:
        raise optiplug.ConfigError(
            "muon: this is a LoRA (PEFT) model, and Muon orthogonalizes the update of each whole weight matrix, "
            "not of its thin adapter factors (separately orthogonalized A and B do not give an orthogonal update "
            "of B @ A, and adjust_lr's sqrt(fan_out/fan_in) scales a d x r factor's step by sqrt(d/r)): "
            "fine-tune the full model with muon, or train the adapters with adamw or loraplus"
        )
    engine = ctx.distributed
    if engine == "fsdp":  # FSDP2 steps through optiplug.MatrixOptimizer's sharded step; FSDP1 is refused
        optiplug.check_whole_matrices(ctx, "muon", "orthogonalizes each whole weight matrix")
    route = routing(ctx, cfg)
    if not route.muon:
        raise optiplug.ConfigError(_no_muon_message(route))
    if engine == "deepspeed":
        from optiplug_muon.deepspeed_check import check_deepspeed  # with the config module: not at registration

        check_deepspeed(ctx, cfg, route)


ADAMW_ROLE = "adamw (not a hidden matrix)"


def param_groups(ctx: optiplug.BuildContext, cfg: MuonConfig, route: Routing) -> tuple[list[dict], list[dict]]:
    """``(muon_groups, adamw_groups)``: the context's groups (the user's, and the core's decay rule) split.

    Each group of ``ctx.param_groups`` is split by :func:`optiplug.split_param_groups` into its Muon
    matrices and the rest, and each Muon part again into plain and transposed (``Conv1D``) matrices.
    The Muon parts come first, as 0.1.0 saved them: the Trainer's ``learning_rate`` column stays Muon's
    and older checkpoints load onto the same groups.
    """
    parameters = dict(ctx.named_parameters())
    muon = [parameters[s.name] for s in route.muon]
    flipped = {id(parameters[s.name]) for s in route.muon if s.module_type in TRANSPOSED_MODULES}
    on_muon = {id(p) for p in muon}
    muon_groups, adamw_groups = [], []
    for part in optiplug.split_param_groups(ctx.param_groups(cfg.weight_decay), muon):
        if id(part["params"][0]) not in on_muon:
            adamw_groups.append({**part, optiplug.GROUP_ROLE: ADAMW_ROLE})
            continue
        for flag, role in ((False, "muon"), (True, "muon (transposed Conv1D)")):
            params = [p for p in part["params"] if (id(p) in flipped) == flag]
            if params:
                muon_groups.append({**part, "params": params, "transposed": flag, optiplug.GROUP_ROLE: role})
    return muon_groups, adamw_groups


def build(ctx: optiplug.BuildContext, cfg: MuonConfig) -> Any:
    """One optimizer over the model's trainable parameters, split by :func:`routing`.

    ``MuonWithAdamW`` (torch.optim.Muon's steps; under FSDP2 each matrix orthogonalized once, by one
    process) in one process, under DDP and FSDP2; under DeepSpeed, DeepSpeed's own Muon with the same
    split (:class:`optiplug_muon.zero.DeepSpeedMuonWithAdamW`).
    """
    route = routing(ctx, cfg)
    if not route.muon:  # also when the check was skipped: never a silent AdamW-only run
        raise optiplug.ConfigError(_no_muon_message(route))
    muon_groups, adamw_groups = param_groups(ctx, cfg, route)
    kernel = optiplug.kernel_kwargs(cfg.kernel, adamw_groups) if adamw_groups else None
    optimizer: Any
    if ctx.distributed == "deepspeed":
        from optiplug_muon.zero import DeepSpeedMuonWithAdamW

        stage = ctx.deepspeed_stage or 0
        role = {optiplug.GROUP_ROLE: f"muon (DeepSpeed ZeRO-{stage})"}
        optimizer = DeepSpeedMuonWithAdamW(
            [{k: v for k, v in {**group, **role}.items() if k != "transposed"} for group in muon_groups],
            adamw_groups,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            adamw_lr=cfg.adamw_lr,
            adamw_betas=cfg.adamw_betas,
            adamw_eps=cfg.adamw_eps,
            adamw_kernel=kernel,
            zero_stage=stage,
        )
    else:
        from optiplug_muon.optim import MuonWithAdamW

        optimizer = MuonWithAdamW(
            muon_groups,
            adamw_groups,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            ns_coefficients=cfg.ns_coefficients,
            ns_eps=cfg.ns_eps,
            ns_steps=cfg.ns_steps,
            ns_dtype=cfg.ns_dtype,
            adjust_lr=cfg.adjust_lr,
            weight_decay=cfg.weight_decay,
            adamw_lr=cfg.adamw_lr,
            adamw_betas=cfg.adamw_betas,
            adamw_eps=cfg.adamw_eps,
            adamw_kernel=kernel,
        )
    optimizer.routing = route
    logger.info("%s", route.summary())
    return optimizer


def describe(shapes: Sequence[optiplug.ParamShape], cfg: MuonConfig) -> str:
    """What goes where, for ``optiplug estimate``: ``muon: 14 matrices (0.43M parameters) · adamw: ...``."""
    return Routing.of(shapes, cfg.adamw_patterns).summary()


def state_bytes(shapes: Sequence[optiplug.ParamShape], cfg: MuonConfig) -> int:
    """One momentum buffer per Muon matrix (torch's Muon keeps no step); AdamW's two moments and step elsewhere."""
    route = Routing.of(shapes, cfg.adamw_patterns)
    return optiplug.moment_bytes(route.muon, 1, scalars=0) + optiplug.adam_state_bytes(route.adamw)
