"""BAdam in a real Trainer: parity with LLaMA-Factory's wiring, what the entry adds, its checks, exact resume."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import MethodType

import pytest
import torch
from optiplug_badam.callback import BAdamTrainerCallback
from transformers import Trainer, TrainerCallback

import optiplug
from optiplug.testing import TokenBlocks, logged_losses, tiny_llama, training_args

pytestmark = pytest.mark.filterwarnings("ignore:badam. .* never updated:UserWarning")

LR = 1e-3


class LlamaFactoryTrainer(Trainer):
    """A plain Trainer wired for BAdam by hand, as LLaMA-Factory's trainers and ``_create_badam_optimizer`` do.

    Two settings are made explicit where LLaMA-Factory leaves badam's defaults: ratio mode's
    ``switch_every`` (badam's 100), and the base AdamW's ``weight_decay=0.0`` (badam rebuilds its groups
    with the base optimizer's default, torch's 0.01, whatever ``TrainingArguments.weight_decay`` says).
    """

    def __init__(self, *args, badam: dict, **kwargs):
        self.badam = badam
        super().__init__(*args, **kwargs)
        from badam import BAdamCallback, clip_grad_norm_old_version

        self.accelerator.clip_grad_norm_ = MethodType(clip_grad_norm_old_version, self.accelerator)
        self.add_callback(BAdamCallback)

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
        from transformers.trainer_pt_utils import get_parameter_names

        model = self.model
        decay_names = [n for n in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if "bias" not in n]
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                (decay if name in decay_names else no_decay).append(param)
        optim_class, optim_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args)
        groups = [dict(params=no_decay, weight_decay=0.0), dict(params=decay, weight_decay=self.args.weight_decay)]
        if self.badam["mode"] == "layer":
            from badam import BlockOptimizer

            self.optimizer = BlockOptimizer(
                base_optimizer=optim_class(groups, **optim_kwargs, weight_decay=0.0),
                named_parameters_list=list(model.named_parameters()),
                block_prefix_list=None,
                switch_block_every=self.badam["switch_every"],
                start_block=None,
                switch_mode=self.badam["switch_mode"],
                verbose=0,
            )
        else:
            from badam import BlockOptimizerRatio

            self.optimizer = BlockOptimizerRatio(
                param_groups=groups,
                named_parameters_list=list(model.named_parameters()),
                update_ratio=self.badam["update_ratio"],
                mask_mode=self.badam["mask_mode"],
                verbose=0,
                include_embedding=False,
                switch_every=self.badam["switch_every"],
                **optim_kwargs,
            )
        return self.optimizer


class Probe(TrainerCallback):
    """Records, at every step, whether the accelerator patch and the BAdam callback are in place."""

    def __init__(self):
        self.trainer = None
        self.seen: list[tuple[bool, bool]] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append(present(self.trainer))


def present(trainer) -> tuple[bool, bool]:
    from badam import clip_grad_norm_old_version

    clip = trainer.accelerator.__dict__.get("clip_grad_norm_")
    patched = getattr(clip, "__func__", None) is clip_grad_norm_old_version
    called_back = any(isinstance(cb, BAdamTrainerCallback) for cb in trainer.callback_handler.callbacks)
    return patched, called_back


SETTINGS = {
    "layer-ascending": dict(mode="layer", switch_mode="ascending", switch_every=3),
    "layer-random-bf16": dict(mode="layer", switch_mode="random", switch_every=3, dtype=torch.bfloat16),
    "ratio-scatter": dict(mode="ratio", mask_mode="scatter", update_ratio=0.1, switch_every=3),
}


def model_for(setting: dict):
    return tiny_llama(seed=0, layers=2).to(setting.get("dtype", torch.float32))


def optimizer_config(setting: dict) -> dict:
    return {"name": "badam", "lr": LR, **{k: v for k, v in setting.items() if k != "dtype"}}


def plugin_trainer(out, setting: dict, callbacks=(), steps: int = 8, **args):
    return optiplug.OptiTrainer(
        model=model_for(setting),
        args=training_args(out, max_steps=steps, learning_rate=LR, **args),
        train_dataset=TokenBlocks(n=32, distinct=4),
        optimizer=optimizer_config(setting),
        callbacks=list(callbacks),
    )


@pytest.fixture(scope="module")
def layer_run(tmp_path_factory):
    """One plugin run in layer mode with a probe, its logs and its stdout."""
    probe = Probe()
    trainer = plugin_trainer(tmp_path_factory.mktemp("layer"), SETTINGS["layer-ascending"], callbacks=[probe])
    probe.trainer = trainer
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("transformers.trainer.badam")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            trainer.train()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return trainer, probe, [r.getMessage() for r in records], stdout.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SETTINGS))
def test_same_losses_as_llama_factory_wiring(name, tmp_path, layer_run):
    setting = SETTINGS[name]
    if name == "layer-ascending":
        ours = logged_losses(layer_run[0])
    else:
        trainer = plugin_trainer(tmp_path / "ours", setting)
        trainer.train()
        ours = logged_losses(trainer)
    optim = {"optim": "adamw_torch"} if setting["mode"] == "ratio" else {}  # its ratio mode fails on the fused default
    reference = LlamaFactoryTrainer(
        model=model_for(setting),
        args=training_args(tmp_path / "reference", max_steps=8, learning_rate=LR, **optim),
        train_dataset=TokenBlocks(n=32, distinct=4),
        badam=optimizer_config(setting),
    )
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # badam's float32 warning
        reference.train()
    assert len(ours) == 8 and ours == logged_losses(reference)


def test_patch_and_callback_only_during_training_with_badam(layer_run, tmp_path):
    trainer, probe, _, _ = layer_run
    assert probe.seen == [(True, True)] * 8
    assert present(trainer) == (False, False)
    assert "gradient_checkpointing_enable" not in trainer.model.__dict__
    assert all(p.requires_grad for p in trainer.model.parameters())

    probe = Probe()
    other = optiplug.OptiTrainer(
        model=tiny_llama(),
        args=training_args(tmp_path, max_steps=2),
        train_dataset=TokenBlocks(n=8),
        optimizer="adamw",
        callbacks=[probe],
    )
    probe.trainer = other
    other.train()
    assert probe.seen == [(False, False)] * 2


def test_block_switches_are_logged_not_printed(layer_run):
    _, _, messages, stdout = layer_run
    assert messages == [
        "badam: block 0 of 2 active from step 1 (model.layers.0.)",
        "badam: block 1 of 2 active from step 3 (model.layers.1.)",
        "badam: block 0 of 2 active from step 6 (model.layers.0.)",
        "badam: block 1 of 2 active from step 9 (model.layers.1.)",
    ]
    assert "trainable" not in stdout
    assert all(
        line.startswith("{") for line in stdout.splitlines() if "block" in line
    )  # only the Trainer's log records


# ---- checks ---------------------------------------------------------------------------------


@dataclass
class Launched(optiplug.BuildContext):
    """A BuildContext as a multi-process launch would describe it (this machine cannot launch one)."""

    engine: str = "none"
    processes: int = 1
    stage: int | None = None

    @property
    def distributed(self) -> str:
        return self.engine

    @property
    def world_size(self) -> int:
        return self.processes

    @property
    def deepspeed_stage(self) -> int | None:
        return self.stage


def check(ctx, **fields):
    entry = optiplug.get_entry("badam")
    entry.check(ctx, entry.config(**fields))


@pytest.mark.parametrize(
    ("launch", "fields", "message"),
    [
        (
            dict(engine="ddp", processes=2),
            dict(mode="ratio"),
            "badam: mode 'ratio' runs in a single process and this run is distributed (ddp, 2 processes): train on "
            "one device, or use mode 'layer' with DeepSpeed ZeRO-3",
        ),
        (
            dict(engine="deepspeed", processes=2, stage=3),
            dict(mode="ratio"),
            "badam: mode 'ratio' runs in a single process and this run is distributed (deepspeed, 2 processes): "
            "train on one device, or use mode 'layer' with DeepSpeed ZeRO-3",
        ),
        (
            dict(engine="ddp", processes=4),
            {},
            "badam: mode 'layer' trains distributed only under DeepSpeed ZeRO-3, not DDP: launch with a DeepSpeed "
            "config whose zero_optimization.stage is 3",
        ),
        (
            dict(engine="fsdp", processes=2),
            {},
            "badam: mode 'layer' trains distributed only under DeepSpeed ZeRO-3, not FSDP: launch with a DeepSpeed "
            "config whose zero_optimization.stage is 3",
        ),
        (
            dict(engine="deepspeed", processes=2, stage=2),
            {},
            "badam: mode 'layer' under DeepSpeed needs ZeRO stage 3, not stage 2: set zero_optimization.stage to 3 "
            "in the DeepSpeed config",
        ),
    ],
)
def test_distributed_checks(launch, fields, message):
    with pytest.raises(optiplug.ConfigError) as error:
        check(Launched(model=tiny_llama(), **launch), **fields)
    assert str(error.value) == message


def test_layer_mode_under_zero3_passes_the_check():
    check(Launched(model=tiny_llama(), engine="deepspeed", processes=2, stage=3))


@pytest.mark.parametrize(
    ("args", "fields", "message"),
    [
        (
            dict(gradient_accumulation_steps=2),
            dict(mode="ratio"),
            "badam: mode 'ratio' needs gradient_accumulation_steps 1, got 2 (its sparse-gradient hook runs on every "
            "micro-batch and moves the update window once per micro-batch at a switch): set it to 1, or use mode 'layer'",
        ),
        (
            dict(activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True}),
            {},
            "badam: activation checkpointing with use_reentrant=True gets no gradient for the active block (badam's "
            "callback stops the embedding output from requiring grad): set "
            "training.activation_checkpointing_kwargs.use_reentrant to false",
        ),
        (
            {},
            dict(blocks=[["model.layers.0."], ["model.layers.7."]]),
            "badam: optimizer.blocks[1] ['model.layers.7.'] matches no trainable parameter; names look like: "
            "model.embed_tokens.weight, model.layers.0.self_attn.q_proj.weight, model.layers.0.self_attn.k_proj.weight, "
            "model.layers.0.self_attn.v_proj.weight, model.layers.0.self_attn.o_proj.weight, "
            "model.layers.0.mlp.gate_proj.weight, model.layers.0.mlp.up_proj.weight, "
            "model.layers.0.mlp.down_proj.weight, ... (21 in all)",
        ),
    ],
)
def test_checks_refuse_before_the_first_step(args, fields, message, tmp_path):
    trainer = optiplug.OptiTrainer(
        model=tiny_llama(),
        args=training_args(tmp_path, max_steps=2, **args),
        train_dataset=TokenBlocks(n=8),
        optimizer={"name": "badam", **fields},
    )
    with pytest.raises(optiplug.ConfigError) as error:
        trainer.train()
    assert str(error.value) == message
    assert trainer.state.global_step == 0


def test_non_reentrant_activation_checkpointing_trains(tmp_path):
    trainer = optiplug.OptiTrainer(
        model=tiny_llama(),
        args=training_args(tmp_path, max_steps=2, activation_checkpointing=True),
        train_dataset=TokenBlocks(n=8),
        optimizer="badam",
    )
    trainer.train()
    assert len(logged_losses(trainer)) == 2


# ---- exact resume ---------------------------------------------------------------------------

# (setting, resume points): layer mode switches after steps 2 and 5 (badam's first block is one step
# short), ratio mode moves its window at step 3; the other points are in the middle of a block.
RESUME = {
    "layer-ascending": (dict(mode="layer", switch_mode="ascending", switch_every=3), (2, 4)),
    "layer-descending-bf16": (
        dict(mode="layer", switch_mode="descending", switch_every=3, dtype=torch.bfloat16),
        (2, 4),
    ),
    "layer-random-bf16": (dict(mode="layer", switch_mode="random", switch_every=3, dtype=torch.bfloat16), (2, 4)),
    "layer-fixed": (dict(mode="layer", switch_mode="fixed", start_block=1, switch_every=3), (2, 4)),
    "ratio-adjacent": (dict(mode="ratio", mask_mode="adjacent", switch_every=3), (3, 4)),
    "ratio-scatter": (dict(mode="ratio", mask_mode="scatter", switch_every=3), (3, 4)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RESUME))
def test_resume_reproduces_the_uninterrupted_run(name, tmp_path):
    setting, points = RESUME[name]
    steps = 6
    full = plugin_trainer(tmp_path / "full", setting, steps=steps, save_strategy="steps", save_steps=1)
    full.train()
    uninterrupted = logged_losses(full)
    for point in points:
        checkpoint = Path(tmp_path / "full" / f"checkpoint-{point}")
        state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
        assert state["badam"]["global_step"] == point
        resumed = plugin_trainer(tmp_path / f"resumed-{point}", setting, steps=steps)
        resumed.train(resume_from_checkpoint=str(checkpoint))
        after = {step: loss for step, loss in logged_losses(resumed).items() if step > point}
        assert after == {step: uninterrupted[step] for step in range(point + 1, steps + 1)}, f"resumed at {point}"


def test_active_block_joins_the_trainer_log_records(layer_run):
    trainer = layer_run[0]
    blocks = [h["badam_active_block"] for h in trainer.state.log_history if "loss" in h]
    assert len(blocks) == 8 and blocks[0] == 0.0 and set(blocks) == {0.0, 1.0}
