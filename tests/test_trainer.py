"""OptiTrainer: checks before any step, patches and callbacks only for the length of train(), composition."""

from __future__ import annotations

from typing import Literal

import pytest
from transformers import Trainer, TrainerCallback

import optiplug
from optiplug.testing import TokenBlocks, logged_losses, tiny_llama, training_args


class Seen(TrainerCallback):
    """Records what the trainer looked like at each step."""

    def __init__(self, trainer_ref):
        self.trainer_ref = trainer_ref
        self.clip_patched: list[bool] = []
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1
        accelerator = self.trainer_ref[0].accelerator
        self.clip_patched.append("clip_grad_norm_" in vars(accelerator))


class PatchedConfig(optiplug.OptimizerConfig):
    """SGD whose entry brings a patch, a callback and a check, like BAdam's."""

    name: Literal["patched_sgd"] = "patched_sgd"
    lr: float = 0.05
    refuse_accumulation: bool = False
    fail_at_step: int = 0


class Marker(TrainerCallback):
    def __init__(self, fail_at_step: int = 0):
        self.fail_at_step = fail_at_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.fail_at_step and state.global_step == self.fail_at_step:
            raise RuntimeError("training blew up")


CALLS: list[str] = []


def _patched_clip(accelerator, original):
    def clip_grad_norm_(parameters, max_norm, norm_type=2):
        CALLS.append("patched-clip")
        return original(parameters, max_norm, norm_type)

    return clip_grad_norm_


def _check(ctx, cfg):
    if cfg.refuse_accumulation and ctx.gradient_accumulation_steps > 1:
        raise optiplug.ConfigError(
            "patched_sgd cannot accumulate gradients: set training.gradient_accumulation_steps=1"
        )


def _build(ctx, cfg):
    import torch

    return torch.optim.SGD(ctx.param_groups(0.0), lr=cfg.lr)


class PatchedPlugin:
    @optiplug.hookimpl
    def register_optimizers(self, register):
        register(
            optiplug.OptimizerEntry(
                config=PatchedConfig,
                build=_build,
                summary="test optimizer with a patch",
                patches=lambda cfg: [optiplug.Patch("accelerator", "clip_grad_norm_", _patched_clip, "test")],
                callbacks=lambda cfg: [Marker(cfg.fail_at_step)],
                check=_check,
            )
        )


@pytest.fixture
def patched(temp_plugin):
    CALLS.clear()
    return temp_plugin(PatchedPlugin(), "patched-plugin")


def _make(tmp_path, optimizer, trainer_cls=optiplug.OptiTrainer, **args):
    ref: list = []
    seen = Seen(ref)
    trainer = trainer_cls(
        model=tiny_llama(),
        args=training_args(tmp_path, **args),
        train_dataset=TokenBlocks(16),
        optimizer=optimizer,
        scheduler="constant",
        callbacks=[seen],
    )
    ref.append(trainer)
    return trainer, seen


def _has_marker(trainer) -> bool:
    return any(isinstance(cb, Marker) for cb in trainer.callback_handler.callbacks)


def test_patch_and_callback_only_during_train(patched, tmp_path):
    trainer, seen = _make(tmp_path, "patched_sgd", max_steps=3)
    assert "clip_grad_norm_" not in vars(trainer.accelerator) and not _has_marker(trainer)
    trainer.train()
    assert seen.clip_patched == [True, True, True]
    assert CALLS == ["patched-clip"] * 3  # the patched function really ran
    assert "clip_grad_norm_" not in vars(trainer.accelerator)
    assert not _has_marker(trainer)


def test_patches_are_undone_when_training_raises(patched, tmp_path):
    trainer, seen = _make(tmp_path, {"name": "patched_sgd", "fail_at_step": 2}, max_steps=5)
    with pytest.raises(RuntimeError, match="training blew up"):
        trainer.train()
    assert seen.clip_patched == [True, True]
    assert "clip_grad_norm_" not in vars(trainer.accelerator) and not _has_marker(trainer)


def test_other_optimizers_get_neither_patch_nor_callback(patched, tmp_path):
    trainer, seen = _make(tmp_path, "sgd", max_steps=2)
    trainer.train()
    assert seen.clip_patched == [False, False] and CALLS == []


def test_two_trainers_do_not_see_each_others_patches(patched, tmp_path):
    plain, plain_seen = _make(tmp_path / "a", "sgd", max_steps=2)
    patched_trainer, _ = _make(tmp_path / "b", "patched_sgd", max_steps=2)

    class TrainOtherInside(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                plain.train()  # runs while the patched trainer is mid-train

    patched_trainer.add_callback(TrainOtherInside())
    patched_trainer.train()
    assert plain_seen.clip_patched == [False, False]
    assert CALLS == ["patched-clip", "patched-clip"]


def test_check_fails_before_any_step(patched, tmp_path):
    trainer, seen = _make(
        tmp_path, {"name": "patched_sgd", "refuse_accumulation": True}, max_steps=2, gradient_accumulation_steps=2
    )
    with pytest.raises(
        optiplug.ConfigError,
        match=r"patched_sgd cannot accumulate gradients: set training\.gradient_accumulation_steps=1",
    ):
        trainer.train()
    assert seen.steps == 0 and trainer.optimizer is None


class CountingTrainer(Trainer):
    """Another Trainer subclass, as a user's SFT trainer would be."""

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        self.loss_calls = getattr(self, "loss_calls", 0) + 1
        return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)


class MyTrainer(optiplug.OptiTrainerMixin, CountingTrainer):
    pass


def test_mixin_composes_with_another_trainer_subclass(patched, tmp_path):
    trainer, seen = _make(tmp_path, "patched_sgd", trainer_cls=MyTrainer, max_steps=3)
    trainer.train()
    assert trainer.loss_calls == 3 and seen.clip_patched == [True] * 3
    import torch

    assert type(trainer.optimizer.optimizer) is torch.optim.SGD


def test_scheduler_is_built_on_the_raw_optimizer(tmp_path):
    trainer, _ = _make(tmp_path, "adamw", max_steps=2)
    trainer.scheduler_config = optiplug.parse_scheduler("linear")
    trainer.train()
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"
    assert trainer.lr_scheduler.optimizer is trainer.optimizer.optimizer


def test_defaults_follow_training_arguments(tmp_path):
    trainer = optiplug.OptiTrainer(
        model=tiny_llama(),
        args=training_args(
            tmp_path, learning_rate=0.003, weight_decay=0.1, lr_scheduler_type="linear", warmup_steps=2, max_steps=4
        ),
        train_dataset=TokenBlocks(16),
    )
    assert trainer.optimizer_config.name == "adamw" and trainer.optimizer_config.lr == 0.003
    assert trainer.optimizer_config.weight_decay == 0.1 and trainer.scheduler_config.name == "linear"
    trainer.train()
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert lrs[:3] == pytest.approx([0.0, 0.0015, 0.003])  # the lr of each step: warmup over 2 steps
    assert lrs[3] == pytest.approx(0.0015)  # then linear decay to 0 at step 4


def test_optimizers_argument_is_refused(tmp_path):
    import torch

    model = tiny_llama()
    with pytest.raises(optiplug.ConfigError, match="pass optimizer= and scheduler="):
        optiplug.OptiTrainer(
            model=model,
            args=training_args(tmp_path),
            train_dataset=TokenBlocks(8),
            optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
        )


def test_optiplug_matches_a_plain_trainer_with_the_same_adamw(tmp_path):
    common = dict(max_steps=5, learning_rate=2e-3, weight_decay=0.01, lr_scheduler_type="cosine", warmup_steps=1)
    plain = Trainer(model=tiny_llama(), args=training_args(tmp_path / "plain", **common), train_dataset=TokenBlocks(32))
    plain.train()
    ours = optiplug.OptiTrainer(
        model=tiny_llama(), args=training_args(tmp_path / "ours", **common), train_dataset=TokenBlocks(32)
    )
    ours.train()
    assert logged_losses(ours) == logged_losses(plain)


class Note(TrainerCallback):
    pass


class CrossCutting:
    @optiplug.hookimpl
    def trainer_callbacks(self, trainer, config):
        return [Note()]


def test_cross_cutting_callbacks_apply_to_every_optimizer(temp_plugin, tmp_path):
    temp_plugin(CrossCutting(), "cross-cutting")
    for name in ("sgd", "adamw"):
        trainer, _ = _make(tmp_path / name, name, max_steps=1)
        assert any(isinstance(cb, Note) for cb in trainer.callback_handler.callbacks)


def test_save_processor_callback_writes_into_checkpoints_and_output(tmp_path):
    class FakeProcessor:
        def save_pretrained(self, path):
            import pathlib

            pathlib.Path(path).mkdir(parents=True, exist_ok=True)
            (pathlib.Path(path) / "processor.json").write_text("{}")

    trainer = optiplug.OptiTrainer(
        model=tiny_llama(),
        args=training_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=1),
        train_dataset=TokenBlocks(8),
        processor=FakeProcessor(),
    )
    trainer.train()
    assert (tmp_path / "checkpoint-1" / "processor.json").is_file()
    assert (tmp_path / "checkpoint-2" / "processor.json").is_file()
    assert (tmp_path / "processor.json").is_file()


def test_build_optimizer_and_scheduler_in_a_plain_loop():
    import torch

    model = tiny_llama()
    optimizer = optiplug.build_optimizer(model, "adamw", lr=0.01, weight_decay=0.1)
    scheduler = optiplug.build_scheduler(optimizer, "linear", num_training_steps=10, warmup_steps=2)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in no_decay["params"])  # the norms
    batch = TokenBlocks(4)[0]
    losses = []
    for _ in range(4):
        loss = model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert isinstance(optimizer, torch.optim.AdamW)


def test_optimizer_log_values_join_the_log_records(temp_plugin, tmp_path):
    class Reporting:
        @optiplug.hookimpl
        def register_optimizers(self, register):
            def build(ctx, cfg):
                import torch

                class SGDWithReport(torch.optim.SGD):
                    def log_values(self):
                        return {"sgd_groups": float(len(self.param_groups))}

                return SGDWithReport(ctx.param_groups(0.0), lr=cfg.lr)

            register(optiplug.OptimizerEntry(config=ReportingConfig, build=build))

    temp_plugin(Reporting(), "reporting")
    trainer, _ = _make(tmp_path, "reporting_sgd", max_steps=2)
    trainer.train()
    records = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["sgd_groups"] for h in records] == [2.0, 2.0]


class ReportingConfig(optiplug.OptimizerConfig):
    name: Literal["reporting_sgd"] = "reporting_sgd"
    lr: float = 0.01


def test_a_training_argument_the_optimizer_overrides_is_reported(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="optiplug.trainer"):
        optiplug.OptiTrainer(
            model=tiny_llama(),
            args=training_args(tmp_path, learning_rate=0.5),
            train_dataset=TokenBlocks(8),
            optimizer={"name": "adamw", "lr": 0.001},
        )
    assert "TrainingArguments.learning_rate=0.5 is not used: the optimizer config's value 0.001 is" in caplog.text
