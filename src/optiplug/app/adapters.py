"""Fine-tuning types: apply a ``finetuning`` config to a model, and the PiSSA-to-LoRA conversion callback.

``full`` trains every parameter, ``freeze`` only those whose names match ``trainable``, and
``lora`` wraps the model in a LoRA adapter with the ``peft`` library (imported only then;
``pip install 'optiplug[lora]'``).

PiSSA (``init: pissa`` or ``pissa_niter_N``) starts the adapter from the principal singular
vectors of each target weight and leaves the residual in the base weight, so the adapter
only applies to that residual. :class:`PissaConvertCallback` (added by ``optiplug train``
through :func:`pissa_callbacks` when ``pissa_convert`` is set) saves, under the output
directory::

    pissa_init/       the initial adapter (A0, B0): what training started from
    pissa_trained/    the trained PiSSA adapter (applies to the residual base model)
    pissa_converted/  a plain LoRA adapter (rank 2r) for the *original* base model:
                      B A - B0 A0 = [B | -B0] [A ; A0]
"""

from __future__ import annotations

import os
import re
import warnings
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from optiplug.app.config import FinetuningConfig
from optiplug.errors import CheckpointError, ConfigError, MissingDependencyError
from optiplug.params import ALL_LINEAR, match_modules

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "BASE_MODEL_DIR",
    "PISSA_CONVERTED_DIR",
    "PISSA_INIT_DIR",
    "PISSA_TRAINED_DIR",
    "PissaConvertCallback",
    "apply_finetuning",
    "freeze",
    "is_lora_model",
    "lora_config",
]

BASE_MODEL_DIR = "base_model"
"""Where ``optiplug train`` saves a LoRA run's base model when it is not on disk (embedded or from scratch)."""
PISSA_INIT_DIR = "pissa_init"
PISSA_TRAINED_DIR = "pissa_trained"
PISSA_CONVERTED_DIR = "pissa_converted"

_PLAIN_NAME = re.compile(r"[\w.]+")


def _peft():
    try:
        import peft
    except ImportError:
        raise MissingDependencyError(
            "finetuning.type 'lora' needs the package 'peft', which is not installed: pip install 'optiplug[lora]'"
        ) from None
    return peft


def apply_finetuning(model: nn.Module, finetuning: FinetuningConfig | dict | None) -> nn.Module:
    """Make ``model`` train what ``finetuning`` says and return the model to train.

    Args:
        model: a transformers model.
        finetuning: a :class:`~optiplug.app.FinetuningConfig` (or its fields as a mapping); None is ``full``.

    Returns:
        ``model`` itself for ``full`` and ``freeze`` (with ``requires_grad`` set), or the
        ``peft`` model wrapping it for ``lora`` (the base weights frozen; with PiSSA the
        target weights hold the residual).

    Raises:
        ConfigError: a ``trainable`` pattern or ``target_modules`` matches nothing.
        MissingDependencyError: ``lora`` without ``peft`` installed.
    """
    if finetuning is None:
        finetuning = FinetuningConfig()
    elif not isinstance(finetuning, FinetuningConfig):
        finetuning = FinetuningConfig.model_validate(finetuning)
    if finetuning.type == "freeze":
        freeze(model, finetuning.trainable)
        return model
    if finetuning.type == "lora":
        peft = _peft()
        return peft.get_peft_model(model, lora_config(model, finetuning))
    return model


def freeze(model: nn.Module, trainable: list[str]) -> None:
    """Train only the parameters whose names match one of the ``trainable`` regexes (``re.search``).

    Raises:
        ConfigError: a pattern matches no parameter name (the message shows what names look like).
    """
    patterns = [re.compile(pattern) for pattern in trainable]
    names = [name for name, _ in model.named_parameters()]
    for pattern in patterns:
        if not any(pattern.search(name) for name in names):
            shown = ", ".join(names[:2] + names[-1:]) if len(names) > 3 else ", ".join(names)
            raise ConfigError(
                f"finetuning.trainable: {pattern.pattern!r} matches no parameter name; names look like: {shown}"
            )
    for name, param in model.named_parameters():
        param.requires_grad_(any(pattern.search(name) for pattern in patterns))


def _target_module_names(model: nn.Module, targets: str | list[str]) -> list[str]:
    from torch import nn

    if isinstance(targets, str) and targets != ALL_LINEAR and _PLAIN_NAME.fullmatch(targets):
        targets = [targets]  # a bare name (q_proj) selects by name, not as an anchored regex
    types = None if targets == ALL_LINEAR else (nn.Linear, nn.Embedding)
    try:
        return match_modules(model, targets, module_types=types)
    except ConfigError as error:
        raise ConfigError(f"finetuning.{error}") from None


def lora_config(model: nn.Module, finetuning: FinetuningConfig) -> Any:
    """The ``peft.LoraConfig`` for ``finetuning`` on ``model`` (target modules resolved to full names)."""
    peft = _peft()
    inits: dict[str, bool | str] = {"default": True, "gaussian": "gaussian"}
    init = inits.get(finetuning.init, finetuning.init)
    return peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=finetuning.r,
        lora_alpha=finetuning.lora_alpha,
        lora_dropout=finetuning.dropout,
        target_modules=_target_module_names(model, finetuning.target_modules),
        init_lora_weights=init,
    )


def is_lora_model(model: Any) -> bool:
    """True for a ``peft`` model whose active adapter is LoRA."""
    config = getattr(model, "peft_config", None)
    if not isinstance(config, dict) or not config:
        return False
    active = getattr(model, "active_adapter", "default")
    active = active[0] if isinstance(active, (list, tuple)) else active
    return str(getattr(config.get(active), "peft_type", "")).upper().endswith("LORA")


class PissaConvertCallback(TrainerCallback):
    """Save the initial, trained and converted PiSSA adapters (what LLaMA-Factory's ``pissa_convert`` does).

    The initial adapter is copied (on the CPU, adapter-sized) when the callback is created, so
    it must be created on the freshly initialised PiSSA model, before any checkpoint is loaded;
    a run resumed from a checkpoint then still converts against the true initial adapter. At
    train begin it is written to ``output_dir/pissa_init``; at train end the trained adapter
    goes to ``output_dir/pissa_trained`` and the conversion to ``output_dir/pissa_converted``.
    The model itself is left as it was.

    Args:
        model: the PiSSA-initialised ``peft`` model, or None to take the initial adapter at the
            start of a training run that does not resume (``global_step == 0``).
        adapter_name: the adapter to save and convert.

    Raises:
        ConfigError: ``model`` is not a LoRA model initialised with PiSSA.
    """

    def __init__(self, model: Any = None, adapter_name: str = "default"):
        self.adapter_name = adapter_name
        self.initial: dict[str, Any] | None = None
        if model is not None:
            self._check(model)
            self.initial = self._adapter_state(model)

    def _check(self, model: Any) -> None:
        if not is_lora_model(model) or self.adapter_name not in model.peft_config:
            raise ConfigError(
                f"pissa_convert needs a LoRA model with adapter {self.adapter_name!r} (apply finetuning.type 'lora' "
                f"with init 'pissa' first), got {type(model).__name__}"
            )
        init = str(model.peft_config[self.adapter_name].init_lora_weights)
        if not init.startswith("pissa"):
            raise ConfigError(f"pissa_convert needs a LoRA adapter initialised with PiSSA (its init is {init!r})")

    def _adapter_state(self, model: Any) -> dict[str, Any]:
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model, adapter_name=self.adapter_name, save_embedding_layers=False)
        return {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in state.items()}

    def _save_initial(self, model: Any, directory: str) -> None:
        from safetensors.torch import save_file

        config = _plain_lora_config(model, self.adapter_name)
        os.makedirs(directory, exist_ok=True)
        assert self.initial is not None  # taken at the start of training
        save_file(self.initial, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(directory)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._check(model)
        if self.initial is None:
            if state.global_step > 0:
                if not os.path.isfile(os.path.join(args.output_dir, PISSA_INIT_DIR, "adapter_config.json")):
                    raise CheckpointError(
                        f"pissa_convert: resuming at step {state.global_step} without the initial PiSSA adapter "
                        f"({os.path.join(args.output_dir, PISSA_INIT_DIR)} is missing); create the callback with the "
                        "freshly initialised model, PissaConvertCallback(model), before loading the checkpoint"
                    )
                return
            self.initial = self._adapter_state(model)
        if args.should_save:
            self._save_initial(model, os.path.join(args.output_dir, PISSA_INIT_DIR))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not args.should_save:
            return
        trained = os.path.join(args.output_dir, PISSA_TRAINED_DIR)
        model.save_pretrained(trained, selected_adapters=[self.adapter_name])
        # peft loads pissa_init as a second adapter, computes [B | -B0] [A ; A0], and deletes it again;
        # its warning against PiSSA next to other adapters is about exactly this conversion.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="PiSSA changes the base weights")
            model.save_pretrained(
                os.path.join(args.output_dir, PISSA_CONVERTED_DIR),
                selected_adapters=[self.adapter_name],
                path_initial_model_for_weight_conversion=os.path.join(args.output_dir, PISSA_INIT_DIR),
            )


def _plain_lora_config(model: Any, adapter_name: str) -> Any:
    """A copy of the adapter's config that loads without re-running the PiSSA decomposition."""
    import copy

    config = copy.deepcopy(model.peft_config[adapter_name])
    config.init_lora_weights = True
    config.inference_mode = True
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = model.base_model.model.__dict__.get("name_or_path") or None
    return config


def pissa_callbacks(trainer: Any, finetuning: FinetuningConfig) -> list[Any]:
    """The callbacks ``optiplug train`` adds for ``finetuning``: PiSSA-to-LoRA conversion when ``pissa_convert`` is set.

    Raises:
        ConfigError: the conversion needs whole weights, and FSDP or ZeRO-3 shards them; or the
            model is not a PiSSA-initialised LoRA model.
    """
    if finetuning.type != "lora" or not finetuning.pissa_convert:
        return []
    ctx = trainer.optiplug_context()
    if ctx.distributed == "fsdp" or ctx.deepspeed_stage == 3:
        raise ConfigError(
            f"finetuning.pissa_convert needs whole weights on each process, which {ctx.distributed} "
            f"{'ZeRO-3 ' if ctx.deepspeed_stage == 3 else ''}shards: convert after training, or train without sharding"
        )
    return [PissaConvertCallback(trainer.model)]
