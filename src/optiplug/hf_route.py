"""``hf_factory``: a registry optimizer for a stock Trainer, through transformers' ``optimizer_cls_and_kwargs``.

transformers (>= 5) treats anything in ``optimizer_cls_and_kwargs`` that is not an ``Optimizer`` subclass as
a factory and calls ``factory()(model, **kwargs)`` in ``create_optimizer``. That is a way into any Trainer
subclass (TRL's ``SFTTrainer`` forwards the argument) without subclassing::

    trainer = SFTTrainer(model=model, args=args, train_dataset=data,
                         optimizer_cls_and_kwargs=optiplug.hf_factory("galore_adamw", rank=8))

The factory sees the model and nothing else: no ``TrainingArguments`` (so ``learning_rate`` and the
other optimizer values come from the config, not from ``args``), no callbacks, no patches, and no
default scheduler (the Trainer builds ``args.lr_scheduler_type``'s). An optimizer that needs any of
these is refused with a sentence pointing to :class:`~optiplug.OptiTrainerMixin`, which does all of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from optiplug.configs import OptimizerConfig
from optiplug.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["RegistryOptimizerFactory", "hf_factory"]

_MIXIN = "use optiplug.OptiTrainerMixin (class MyTrainer(OptiTrainerMixin, TheTrainer)) instead, which does"


def _refusal(cfg: OptimizerConfig) -> str | None:
    """Why ``cfg``'s optimizer cannot train through ``optimizer_cls_and_kwargs`` (None: it can)."""
    from optiplug.registry import get_entry

    entry = get_entry(cfg.name)
    needs = []
    if entry.callbacks is not None:
        needs.append("trainer callbacks")
    if entry.patches is not None:
        needs.append("patches of the trainer")
    if entry.default_scheduler is not None:
        needs.append(f"its own scheduler ({entry.default_scheduler!r})")
    if getattr(cfg, "layerwise", False):
        needs.append("the core's layerwise stepping during train()")
    if not needs:
        return None
    return (
        f"optimizer {cfg.name!r} needs {' and '.join(needs)}, which transformers' optimizer_cls_and_kwargs route "
        f"never runs: {_MIXIN}"
    )


def _engine() -> str | None:
    """DeepSpeed or FSDP when accelerate has one on (the factory runs before the engine wraps the optimizer)."""
    try:
        from accelerate.state import AcceleratorState

        kind = str(getattr(AcceleratorState(), "distributed_type", ""))
    except Exception:  # no accelerator state yet: a plain loop
        return None
    for engine in ("DEEPSPEED", "FSDP"):
        if engine in kind:
            return {"DEEPSPEED": "DeepSpeed", "FSDP": "FSDP"}[engine]
    return None


class RegistryOptimizerFactory:
    """Builds ``config``'s optimizer for the model transformers hands it (``factory()(model)``).

    Args:
        config: the parsed optimizer config.
    """

    def __init__(self, config: OptimizerConfig):
        self.config = config

    def __call__(self, model: nn.Module, **kwargs: Any) -> Any:
        from optiplug.context import BuildContext
        from optiplug.factory import build_from_entry
        from optiplug.registry import get_entry

        if kwargs:
            raise ConfigError(
                f"hf_factory: unexpected keyword arguments {sorted(kwargs)}: put optimizer fields into "
                "hf_factory(name, **fields)"
            )
        entry = get_entry(self.config.name)
        engine = _engine()
        if engine is not None and entry.check is not None:
            raise ConfigError(
                f"optimizer {self.config.name!r} checks what {engine} shards, but transformers' "
                f"optimizer_cls_and_kwargs route builds it before the engine exists: {_MIXIN} the checks"
            )
        return build_from_entry(entry, BuildContext(model=model), self.config)


def hf_factory(optimizer: OptimizerConfig | str | dict | None = None, **fields: Any) -> tuple[Any, dict[str, Any]]:
    """``(factory, kwargs)`` for ``transformers.Trainer(optimizer_cls_and_kwargs=...)`` (and TRL's trainers).

    Args:
        optimizer: a registered name (or alias), a mapping with ``name``, a config, or None for the default.
        **fields: config fields (``rank=8``, ``lr=1e-3``): the factory does not read ``TrainingArguments``.

    Returns:
        A ``(factory, {})`` pair: transformers calls ``factory()(model)``.

    Raises:
        UnknownNameError, ConfigError: a bad name or field, or an optimizer that needs what this route
        never runs (callbacks, patches, its own scheduler, layerwise stepping): use ``OptiTrainerMixin``.
    """
    import functools

    from optiplug.registry import parse_optimizer

    cfg = parse_optimizer(optimizer, **fields)
    problem = _refusal(cfg)
    if problem is not None:
        raise ConfigError(problem)
    return functools.partial(RegistryOptimizerFactory, cfg), {}
