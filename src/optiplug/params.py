"""Parameter selection shared by plugins: decay/no-decay groups and target-module matching."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from optiplug.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from optiplug.configs import ParamGroupRule

__all__ = [
    "ALL_LINEAR",
    "DEFAULT_GROUP",
    "GROUP_KEY",
    "GROUP_ROLE",
    "NO_DECAY_RULE",
    "apply_group_rules",
    "assign_rules",
    "decay_parameter_names",
    "match_modules",
    "param_groups",
]

ALL_LINEAR = "all-linear"

# The same rule as transformers' Trainer.get_decay_parameter_names, so groups match a plain Trainer.
_NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]

NO_DECAY_RULE = (
    "0 on the parameters of nn.LayerNorm modules and on every parameter whose lower-cased name contains "
    "'bias', 'layernorm', 'rmsnorm' or '_norm', or has a 'norm' component ('model.norm.weight'); "
    "the optimizer's weight_decay on the rest (transformers' Trainer.get_decay_parameter_names)"
)
"""The default no-decay rule, in words (``optiplug show`` and the docs print it)."""

_INTERNAL_OPTIONS = ("params", "differentiable", "foreach", "fused", "capturable")

GROUP_KEY = "optiplug_group"
"""The key of a parameter group dict that holds its ``optimizer.param_groups`` label (set only when rules are)."""

GROUP_ROLE = "optiplug_role"
"""The key a plugin may set in each parameter-group dict it builds: a few words on what it does with that group
(``"muon"``, ``"adamw (not a hidden matrix)"``, ``"galore rank 8"``); ``--dry-run`` and the run header print it."""

DEFAULT_GROUP = "default"
"""The label of the parameters no ``optimizer.param_groups`` entry matches."""


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get weight decay: not biases, not norms (as transformers decides)."""
    from torch import nn
    from transformers.trainer_pt_utils import get_parameter_names

    return set(get_parameter_names(model, [nn.LayerNorm], _NO_DECAY_PATTERNS))


def _name_shapes(names: Sequence[str], limit: int = 12) -> str:
    """Parameter names with layer numbers folded (``model.layers.*.mlp.up_proj.weight``), for error messages."""
    folded = list(dict.fromkeys(re.sub(r"\.\d+(?=\.|$)", ".*", name) for name in names))
    more = f", ... ({len(folded) - limit} more)" if len(folded) > limit else ""
    return ", ".join(folded[:limit]) + more


def assign_rules(names: Sequence[str], rules: Sequence[ParamGroupRule]) -> list[int | None]:
    """For each parameter name, the index of the first rule whose ``match`` it contains (``re.search``), or None.

    Raises:
        ConfigError: a rule that takes no parameter (it matches none, or only ones an earlier rule took);
            the message lists what the parameter names look like.
    """
    patterns = [re.compile(rule.match) for rule in rules]
    chosen: list[int | None] = []
    for name in names:
        chosen.append(next((i for i, pattern in enumerate(patterns) if pattern.search(name)), None))
    for i, (rule, pattern) in enumerate(zip(rules, patterns)):
        if i in chosen:
            continue
        where = f"optimizer.param_groups[{i}]"
        earlier = sorted({index for name, index in zip(names, chosen) if pattern.search(name) and index is not None})
        if earlier:
            first = ", ".join(f"param_groups[{j}] (match {rules[j].match!r})" for j in earlier)
            raise ConfigError(
                f"{where}: match {rule.match!r} matches only parameters that {first} already took (first match "
                "wins): put the narrower pattern first"
            )
        raise ConfigError(
            f"{where}: match {rule.match!r} matches no trainable parameter (a regex searched in each name); "
            f"the names are: {_name_shapes(names) or '(no trainable parameters)'}"
        )
    return chosen


def param_groups(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    decay_names: set[str],
    weight_decay: float,
    rules: Sequence[ParamGroupRule] = (),
    **options: Any,
) -> list[dict[str, Any]]:
    """Decay then no-decay groups of the trainable parameters (empty groups are dropped).

    ``options`` (``lr=...``, ...) are added to every group. With ``rules`` (``optimizer.param_groups``)
    the parameters no rule matches come first (decay, no-decay), then each rule's (decay, no-decay);
    each group carries its label under :data:`GROUP_KEY`, and a rule's options override ``options``.
    A rule's ``weight_decay`` applies to the parameters it matches that the no-decay rule leaves
    decayed; its biases and norms keep 0 unless it sets ``decay_all``.
    """
    named = [(name, param) for name, param in named_parameters if param.requires_grad]
    if not rules:
        decay = [param for name, param in named if name in decay_names]
        no_decay = [param for name, param in named if name not in decay_names]
        groups = [
            {"params": decay, "weight_decay": weight_decay, **options},
            {"params": no_decay, "weight_decay": 0.0, **options},
        ]
        return [group for group in groups if group["params"]]
    chosen = assign_rules([name for name, _ in named], rules)
    buckets: dict[tuple[int, bool], list[torch.nn.Parameter]] = {}
    for (name, param), index in zip(named, chosen):
        buckets.setdefault((-1 if index is None else index, name in decay_names), []).append(param)
    groups = []
    for index in range(-1, len(rules)):
        rule = rules[index] if index >= 0 else None
        for decays in (True, False):
            params = buckets.get((index, decays))
            if not params:
                continue
            group: dict[str, Any] = {"params": params, **options, GROUP_KEY: DEFAULT_GROUP}
            rate = weight_decay
            if rule is not None:
                group.update(rule.options)
                group[GROUP_KEY] = rule.label
                rate = weight_decay if rule.weight_decay is None else rule.weight_decay
            group["weight_decay"] = rate if decays or (rule is not None and rule.decay_all) else 0.0
            groups.append(group)
    for index, rule in enumerate(rules):
        if rule.weight_decay and not rule.decay_all and not buckets.get((index, True)):
            raise ConfigError(
                f"optimizer.param_groups[{index}]: match {rule.match!r} sets weight_decay={rule.weight_decay:g} but "
                "matches only parameters the default no-decay rule exempts (biases, norms): set decay_all: true "
                "to decay them"
            )
    return groups


def apply_group_rules(
    optimizer: Any, rules: Sequence[ParamGroupRule], rule_of: dict[int, int | None] | None, name: str
) -> None:
    """Check a freshly built optimizer against ``optimizer.param_groups`` and finish its groups.

    ``rule_of`` maps ``id(parameter)`` to its rule index (None: the default group), as recorded by
    :meth:`BuildContext.param_groups`; None means the factory never called it. Each rule's options
    must be per-group options the optimizer takes (keys of ``optimizer.defaults``); they are set on
    the rule's groups, and ``lr_scale`` multiplies the learning rate each group was built with.

    Raises:
        ConfigError: the optimizer does not take its groups from ``ctx.param_groups`` (or mixes
            parameters of different rules in one group), or a rule sets an option it does not take.
    """
    if not rules:
        return
    if rule_of is None:
        raise ConfigError(
            f"optimizer {name!r} builds its own parameter groups (not with ctx.param_groups), so "
            "optimizer.param_groups cannot apply to it: remove optimizer.param_groups or choose another optimizer"
        )
    defaults = getattr(optimizer, "defaults", None)
    for index, rule in enumerate(rules):
        for key in rule.options:
            if isinstance(defaults, dict) and key not in defaults:
                takes = ", ".join(sorted(k for k in defaults if k not in _INTERNAL_OPTIONS))
                raise ConfigError(
                    f"optimizer.param_groups[{index}].{key}: optimizer {name!r} takes no per-group option {key!r} "
                    f"(it takes: {takes})"
                )
    for group in optimizer.param_groups:
        owners = {rule_of.get(id(param), -1) for param in group["params"]}
        if not owners:
            continue
        if len(owners) > 1 or -1 in owners:
            raise ConfigError(
                f"optimizer {name!r} regroups the parameters it gets from ctx.param_groups (one of its groups mixes "
                "parameters of different optimizer.param_groups entries), so optimizer.param_groups cannot apply "
                "to it: remove optimizer.param_groups or choose another optimizer"
            )
        (owner,) = owners
        if owner is None:
            group[GROUP_KEY] = DEFAULT_GROUP
            continue
        index, rule = owner, rules[owner]
        group[GROUP_KEY] = rule.label
        for key, value in rule.options.items():
            if key != "weight_decay":
                group[key] = value
        if rule.lr_scale is not None:
            if "lr" not in group:
                raise ConfigError(
                    f"optimizer.param_groups[{index}].lr_scale: optimizer {name!r} keeps no learning rate in its "
                    "groups, so there is nothing to scale: remove lr_scale"
                )
            group["lr"] = group["lr"] * rule.lr_scale


def match_modules(
    model: nn.Module, targets: str | Sequence[str], *, module_types: tuple[type, ...] | None = None
) -> list[str]:
    """Names of the modules of ``model`` selected by ``targets``.

    Args:
        targets: ``"all-linear"`` (every ``nn.Linear`` except the output head), a regex matched
            against the full module name (``re.fullmatch``), or a list of names: a module is
            selected when its name equals an item or ends with ``"." + item``.
        module_types: only modules of these types count (default ``nn.Linear``).

    Raises:
        ConfigError: nothing matched; the message names the candidate modules.
    """
    from torch import nn

    module_types = module_types or (nn.Linear,)
    candidates = [(name, m) for name, m in model.named_modules() if name and isinstance(m, module_types)]
    if targets == ALL_LINEAR:
        output = getattr(model, "get_output_embeddings", lambda: None)()
        chosen = [name for name, m in candidates if m is not output]
    elif isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as error:
            raise ConfigError(f"target_modules: {targets!r} is not a valid regex: {error}") from None
        chosen = [name for name, _ in candidates if pattern.fullmatch(name)]
    else:
        items = list(targets)
        chosen = [name for name, _ in candidates if any(name == t or name.endswith("." + t) for t in items)]
    if not chosen:
        suffixes = sorted({name.rsplit(".", 1)[-1] for name, _ in candidates})
        raise ConfigError(
            f"target_modules {targets!r} matches no {'/'.join(t.__name__ for t in module_types)} module; "
            f"available: {', '.join(suffixes) or '(none)'} (or 'all-linear')"
        )
    return chosen
