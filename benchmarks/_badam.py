"""Shared by the badam_* benchmarks: BAdam wired by hand as LLaMA-Factory does it (the reference), and models built in their dtype.

LLaMA-Factory's wiring (``_create_badam_optimizer`` and its trainers' ``__init__``): decay and
no-decay groups, the Trainer's optimizer class and kwargs as the base optimizer, badam's
``BlockOptimizer`` with inferred blocks, ``clip_grad_norm_old_version`` on the accelerator and
``BAdamCallback``. One setting is made explicit: the base AdamW gets ``weight_decay=0.0``,
because badam rebuilds its groups with the base optimizer's default weight decay (torch's 0.01)
whatever the arguments say, and the plugin's runs use no weight decay.
"""

from __future__ import annotations

from types import MethodType
from typing import Any

import _common


def build_model(size: str, dtype: str = "float32", seed: int = 0):
    """A model of ``size`` created directly in ``dtype`` (no float32 copy first, so peak memory is the model's own)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        return _common.build_model(size, seed=seed, dtype=dtype)
    finally:
        torch.set_default_dtype(previous)


def reference_optimizer(model: Any, args: Any, switch_every: int, switch_mode: str = "ascending"):
    """badam's ``BlockOptimizer`` as LLaMA-Factory builds it (layer mode, inferred blocks) from ``TrainingArguments``."""
    from badam import BlockOptimizer
    from transformers import Trainer
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
    from transformers.trainer_pt_utils import get_parameter_names

    decay_names = [n for n in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if "bias" not in n]
    decay: list[Any] = []
    no_decay: list[Any] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if name in decay_names else no_decay).append(param)
    optim_class, optim_kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    groups = [dict(params=no_decay, weight_decay=0.0), dict(params=decay, weight_decay=0.0)]
    with _common.quiet():
        return BlockOptimizer(
            base_optimizer=optim_class(groups, **optim_kwargs, weight_decay=0.0),
            named_parameters_list=list(model.named_parameters()),
            block_prefix_list=None,
            switch_block_every=switch_every,
            start_block=None,
            switch_mode=switch_mode,
            verbose=0,
        )


def reference_trainer(model: Any, args: Any, train_dataset: Any, switch_every: int, switch_mode: str = "ascending"):
    """A plain ``transformers.Trainer`` with the reference optimizer, accelerator patch and callback."""
    from badam import BAdamCallback, clip_grad_norm_old_version
    from transformers import Trainer

    class LlamaFactoryTrainer(Trainer):
        def create_optimizer(self, model=None):
            if self.optimizer is None:
                self.optimizer = reference_optimizer(self.model, self.args, switch_every, switch_mode)
            return self.optimizer

    trainer = LlamaFactoryTrainer(model=model, args=args, train_dataset=train_dataset)
    trainer.accelerator.clip_grad_norm_ = MethodType(clip_grad_norm_old_version, trainer.accelerator)
    trainer.add_callback(BAdamCallback)
    return trainer
