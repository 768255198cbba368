"""Schedule-free in a real Trainer: saved models are x, saving never perturbs training, exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from optiplug_schedulefree.optim import schedule_free_optimizer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

import optiplug
from optiplug.testing import TokenBlocks, logged_losses, tiny_llama, training_args

NAMES = ["schedule_free_adamw", "schedule_free_sgd", "schedule_free_radam"]
SETTINGS = {
    "schedule_free_adamw": {"lr": 1e-2, "warmup_steps": 6, "weight_decay": 0.01},
    "schedule_free_sgd": {"lr": 0.5, "warmup_steps": 6, "weight_decay": 0.01},
    "schedule_free_radam": {"lr": 1e-2, "weight_decay": 0.01},
}


def trainer_for(out: Path, name: str = "schedule_free_adamw", callbacks=(), steps: int = 10, **args):
    return optiplug.OptiTrainer(
        model=tiny_llama(seed=0),
        args=training_args(out, max_steps=steps, **args),
        train_dataset=TokenBlocks(n=32, distinct=4),
        eval_dataset=TokenBlocks(n=8, seed=2),
        optimizer={"name": name, **SETTINGS[name]},
        scheduler="constant",
        callbacks=list(callbacks),
    )


def beta(optimizer, group) -> float:
    return group["momentum"] if "momentum" in group else group["betas"][0]


class AtEverySave(TrainerCallback):
    """After each checkpoint is written: x from the live optimizer (``optimizer.eval()`` on the trainer's
    accelerate-wrapped optimizer, then ``train()`` back), and x computed out of place from y and z
    (upstream's formula: ``x = lerp(y, z, 1 - 1/beta)``)."""

    def __init__(self):
        self.trainer = None
        self.x_eval: dict[int, dict[str, torch.Tensor]] = {}
        self.x_formula: dict[int, dict[str, torch.Tensor]] = {}
        self.y: dict[int, dict[str, torch.Tensor]] = {}

    def on_save(self, args, state, control, **kwargs):
        model, wrapped = self.trainer.model, self.trainer.optimizer
        raw = schedule_free_optimizer(wrapped)
        assert type(wrapped).__name__ == "AcceleratedOptimizer" and raw is not wrapped  # eval()/train() reach through
        training = raw.in_train_mode  # False when an evaluation ran just before this save (the model holds x)
        step = state.global_step
        self.y[step] = {n: (p if training else raw.kept_y[p]).detach().clone() for n, p in model.named_parameters()}
        z = {id(p): raw.state[p]["z"] for p in model.parameters()}
        weight = 1 - 1 / beta(raw, raw.param_groups[0])
        self.x_formula[step] = {n: torch.lerp(self.y[step][n], z[id(p)], weight) for n, p in model.named_parameters()}
        wrapped.eval()
        self.x_eval[step] = {n: p.detach().clone() for n, p in model.named_parameters()}
        if training:
            wrapped.train()
            assert all(torch.equal(p, self.y[step][n]) for n, p in model.named_parameters())


class AtEveryEvaluation(TrainerCallback):
    """Checks, at each evaluation, that the model holds x (computed out of place from the y kept aside)."""

    def __init__(self):
        self.trainer = None
        self.seen = 0

    def on_evaluate(self, args, state, control, **kwargs):
        raw = schedule_free_optimizer(self.trainer.optimizer)
        assert not raw.in_train_mode
        for group in raw.param_groups:
            for p in group["params"]:
                x = torch.lerp(raw.kept_y[p], raw.state[p]["z"], 1 - 1 / beta(raw, group))
                assert torch.equal(p, x)
        self.seen += 1


def saved_weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


@pytest.mark.parametrize("evaluate", [False, True], ids=["no-eval", "eval-every-2"])
def test_every_saved_model_is_x(tmp_path, evaluate):
    saves, evaluations = AtEverySave(), AtEveryEvaluation()
    extra = {"eval_strategy": "steps", "eval_steps": 2} if evaluate else {}
    trainer = trainer_for(
        tmp_path, callbacks=[saves, evaluations], steps=8, save_strategy="steps", save_steps=3, **extra
    )
    saves.trainer = evaluations.trainer = trainer
    trainer.train()
    assert sorted(saves.x_eval) == [3, 6, 8]
    assert evaluations.seen == (4 if evaluate else 0)
    for step, x in saves.x_eval.items():
        on_disk = saved_weights(tmp_path / f"checkpoint-{step}")
        assert on_disk.keys() == x.keys()
        for name, value in on_disk.items():
            assert torch.equal(value, x[name]), f"checkpoint-{step}: {name} is not x"
            assert torch.equal(value, saves.x_formula[step][name])
        assert any(not torch.equal(on_disk[n], saves.y[step][n]) for n in on_disk), "x and y should differ"

    # After train() the model holds x, so the output directory does too, and it is the last checkpoint's x.
    raw = schedule_free_optimizer(trainer.optimizer)
    assert not raw.in_train_mode
    trainer.save_model(str(tmp_path / "final"))
    final = saved_weights(tmp_path / "final")
    assert all(torch.equal(final[n], p) for n, p in trainer.model.named_parameters())
    assert all(torch.equal(final[n], saves.x_eval[8][n]) for n in final)
    # The patch and the callback were only there during train().
    assert "save_model" not in trainer.__dict__ and "_load_best_model" not in trainer.__dict__


@pytest.mark.parametrize("name", NAMES)
def test_saving_and_evaluating_never_perturb_training(tmp_path, name):
    busy = trainer_for(
        tmp_path / "busy", name, steps=12, save_strategy="steps", save_steps=5, eval_strategy="steps", eval_steps=4
    )
    busy.train()
    quiet = trainer_for(tmp_path / "quiet", name, steps=12)
    quiet.train()
    assert (tmp_path / "busy" / "checkpoint-5").is_dir() and any("eval_loss" in h for h in busy.state.log_history)
    losses = logged_losses(quiet)
    assert len(losses) == 12 and logged_losses(busy) == losses
    assert min(list(losses.values())[-3:]) < losses[1], f"{name}: did not learn: {losses}"
    for (n, p), (_, q) in zip(busy.model.named_parameters(), quiet.model.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("name", NAMES)
def test_resume_from_a_checkpoint_of_x_reproduces_the_straight_run(tmp_path, name):
    full = trainer_for(tmp_path / "full", name, steps=10, save_strategy="steps", save_steps=4)
    full.train()
    reference = logged_losses(full)
    checkpoint = tmp_path / "full" / "checkpoint-4"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert all("y" in state and "z" in state for state in saved["state"].values())
    # The checkpoint's weights are x, not the y training goes on from.
    weights = saved_weights(checkpoint)
    names = [n for n, _ in full.model.named_parameters()]
    ys = {names[i]: state["y"] for i, state in saved["state"].items()}
    assert any(not torch.equal(weights[n], y) for n, y in ys.items())

    resumed = trainer_for(tmp_path / "resumed", name, steps=10)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    after = {step: loss for step, loss in logged_losses(resumed).items() if step > 4}
    assert sorted(after) == list(range(5, 11))
    assert after == {step: reference[step] for step in after}
    for (n, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), n


def batch_loss(model) -> float:
    batch = TokenBlocks(n=4, seed=3)
    ids = torch.stack([batch[i]["input_ids"] for i in range(4)])
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def test_model_from_the_output_directory_gives_the_in_memory_eval_loss(tmp_path):
    trainer = trainer_for(tmp_path, steps=10)
    trainer.train()
    trainer.optimizer.eval()  # the live trainer's optimizer, through accelerate's wrapper (already eval)
    trainer.save_model(str(tmp_path / "out"))
    in_memory = batch_loss(trainer.model)
    loaded = batch_loss(AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")))
    assert loaded == in_memory
    trainer.optimizer.train()  # y: what transformers' own checkpoints would hold
    assert batch_loss(trainer.model) != in_memory


def test_load_best_model_at_end_leaves_the_best_x(tmp_path):
    trainer = trainer_for(
        tmp_path,
        steps=8,
        save_strategy="steps",
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
    )
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    weights = saved_weights(best)
    assert all(torch.equal(weights[n], p) for n, p in trainer.model.named_parameters())
    raw = schedule_free_optimizer(trainer.optimizer)
    assert not raw.in_train_mode  # a later train() starts from the last step's y, kept aside


def test_transformers_own_schedule_free_saves_y_which_the_plugin_fixes(tmp_path):
    """The bug this plugin exists for: transformers' ``optim="schedule_free_adamw"`` checkpoints hold y."""
    from transformers import Trainer

    args = training_args(
        tmp_path / "transformers",
        max_steps=4,
        save_strategy="steps",
        save_steps=4,
        optim="schedule_free_adamw",
        learning_rate=1e-2,
        lr_scheduler_type="constant",
    )
    plain = Trainer(model=tiny_llama(seed=0), args=args, train_dataset=TokenBlocks(n=32, distinct=4))
    plain.train()
    raw = plain.optimizer.optimizer
    assert type(raw).__name__ == "AdamWScheduleFree" and raw.param_groups[0]["train_mode"]
    saved = saved_weights(tmp_path / "transformers" / "checkpoint-4")
    assert all(torch.equal(saved[n], p) for n, p in plain.model.named_parameters())  # y, the training point
    plain.optimizer.eval()
    assert any(not torch.equal(saved[n], p) for n, p in plain.model.named_parameters())  # not x


def test_optimizer_param_groups_get_their_rates_and_resume_exactly(tmp_path):
    """optiplug's ``optimizer.param_groups`` rules reach schedule-free's groups (it builds from ctx.param_groups)."""
    rules = [{"match": "embed_tokens", "lr_scale": 0.5}, {"match": "lm_head", "lr_scale": 2.0, "name": "head"}]

    def trainer(out, **args):
        return optiplug.OptiTrainer(
            model=tiny_llama(seed=0),
            args=training_args(out, max_steps=6, **args),
            train_dataset=TokenBlocks(n=32, distinct=4),
            optimizer={"name": "schedule_free_adamw", "lr": 1e-2, "warmup_steps": 2, "param_groups": rules},
            scheduler="constant",
        )

    full = trainer(tmp_path / "full", save_strategy="steps", save_steps=3)
    full.train()
    raw = schedule_free_optimizer(full.optimizer)
    rates = sorted(group["scheduled_lr"] for group in raw.param_groups)
    assert rates == pytest.approx([5e-3, 1e-2, 1e-2, 2e-2])  # embedding, the decay and no-decay rest, head
    reference = logged_losses(full)
    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    after = {step: loss for step, loss in logged_losses(resumed).items() if step > 3}
    assert after == {step: reference[step] for step in range(4, 7)}
