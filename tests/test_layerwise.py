"""``optimizer.layerwise: true`` for any per-parameter optimizer (optiplug.layerwise).

Each parameter is stepped in its post-accumulate-grad hook at the accumulation boundary and its
gradient freed at once. Asserted here on torch's AdamW: the losses equal the whole-model step's,
every per-parameter step reads the scheduled rate, clipping is per parameter while the logged norm
is the true global one, the checkpoint holds every parameter's state (``weights_only``) and a resume
reproduces the uninterrupted run, and the refusals read as one sentence.
"""

from __future__ import annotations

import types
from typing import Literal

import pytest
import torch

import optiplug
from optiplug.factory import build_from_entry
from optiplug.testing import TokenBlocks, logged_losses, tiny_llama, training_args


def _trainer(output_dir, optimizer, scheduler=None, **args):
    return optiplug.OptiTrainer(
        model=tiny_llama(),
        args=training_args(output_dir, **args),
        train_dataset=TokenBlocks(n=64),
        optimizer=optimizer,
        scheduler=scheduler or {"name": "cosine", "warmup_steps": 2},
    )


def _adamw(layerwise: bool, **fields):
    return {"name": "adamw", "lr": 3e-3, "weight_decay": 0.1, "layerwise": layerwise, **fields}


def _history(trainer, key):
    return [h[key] for h in trainer.state.log_history if "loss" in h]


def _spy_steps(optimizer, seen):
    """Record ``(global step, parameter, lr, grad norm)`` in every real step (torch's pre-hook sees the narrowed groups)."""

    def pre_hook(opt, args, kwargs):
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    seen.append((p, group["lr"], float(p.grad.norm())))

    return optimizer.register_step_pre_hook(pre_hook)


@pytest.mark.parametrize("accumulation", [1, 4], ids=["no-accumulation", "accumulate-4"])
def test_layerwise_adamw_losses_equal_the_whole_step(tmp_path, accumulation):
    runs = {}
    for layerwise in (False, True):
        trainer = _trainer(
            tmp_path / str(layerwise),
            _adamw(layerwise),
            max_steps=6,
            gradient_accumulation_steps=accumulation,
            per_device_train_batch_size=8 // accumulation,
            max_grad_norm=0.0,
        )
        seen: list = []
        if layerwise:
            _spy_steps(trainer.create_optimizer(), seen)
        trainer.train()
        runs[layerwise] = (trainer, seen)
    (whole, _), (layerwise, seen) = runs[False], runs[True]
    assert optiplug.layerwise_stepper(layerwise.optimizer) is not None
    assert optiplug.layerwise_stepper(whole.optimizer) is None
    assert logged_losses(layerwise) == logged_losses(whole)  # bit for bit: the same update per parameter
    assert _history(layerwise, "grad_norm") == pytest.approx(_history(whole, "grad_norm"), rel=1e-5)
    # one real step per parameter per optimizer step, each with the scheduled rate of its step
    params = list(layerwise.model.parameters())
    assert len(seen) == 6 * len(params)
    scheduled = _history(whole, "learning_rate")
    per_step = [seen[i * len(params) : (i + 1) * len(params)] for i in range(6)]
    for step, records in enumerate(per_step):
        assert {id(p) for p, _, _ in records} == {id(p) for p in params}
        assert all(lr == pytest.approx(scheduled[step], abs=1e-12) for _, lr, _ in records), step
    assert all(p.grad is None for p in params)  # freed by the hooks


def test_layerwise_clips_each_parameter_and_logs_the_true_global_norm(tmp_path):
    max_norm = 0.05
    constant = {"name": "constant"}  # a 2-step run cannot hold a 2-step warmup (refused); the norms need no schedule
    trainer = _trainer(tmp_path / "layerwise", _adamw(True), constant, max_steps=2, max_grad_norm=max_norm)
    seen: list = []
    _spy_steps(trainer.create_optimizer(), seen)
    trainer.train()
    assert max(norm for _, _, norm in seen) <= max_norm * (1 + 1e-4)  # each parameter clipped on its own
    logged = _history(trainer, "grad_norm")
    assert all(norm > 10 * max_norm for norm in logged)  # the norm before clipping, not a fake 0
    whole = _trainer(tmp_path / "whole", _adamw(False), constant, max_steps=1, max_grad_norm=max_norm)
    whole.train()
    assert logged[0] == pytest.approx(_history(whole, "grad_norm")[0], rel=1e-5)  # same weights, same batch


def test_per_parameter_clipping_is_each_gradient_clipped_to_the_norm_alone():
    """With clipping on, layerwise AdamW == plain AdamW over gradients each clipped by clip_grad_norm_([p], max)."""
    from transformers import TrainingArguments

    max_norm = 0.05
    model, twin = tiny_llama(), tiny_llama()
    args = TrainingArguments(output_dir="/tmp/unused", max_grad_norm=max_norm, use_cpu=True, report_to="none")
    cfg = optiplug.parse_optimizer(_adamw(True))
    layerwise = build_from_entry(optiplug.get_entry("adamw"), optiplug.BuildContext(model=model, args=args), cfg)
    reference = optiplug.build_optimizer(twin, _adamw(False))
    data = TokenBlocks(n=8)
    batch = torch.stack([data[i]["input_ids"] for i in range(4)])
    clipped_any = False
    for _ in range(2):
        model(input_ids=batch, labels=batch).loss.backward()
        twin(input_ids=batch, labels=batch).loss.backward()
        for p in twin.parameters():
            clipped_any |= float(torch.nn.utils.clip_grad_norm_([p], max_norm)) > max_norm
        reference.step()
        reference.zero_grad()
        layerwise.step()  # a no-op: the hooks stepped
    assert clipped_any
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_layerwise_outside_a_trainer_counts_backward_passes():
    model, twin = tiny_llama(), tiny_llama()
    layerwise = optiplug.build_optimizer(model, _adamw(True))
    optiplug.enable_layerwise(layerwise, accumulation_steps=2)  # already enabled: the same stepper is kept
    stepper = optiplug.layerwise_stepper(layerwise)
    assert stepper is not None and stepper.accumulation_steps == 1
    optiplug.disable_layerwise(layerwise)
    assert optiplug.layerwise_stepper(layerwise) is None
    stepper = optiplug.enable_layerwise(layerwise, accumulation_steps=2)
    whole = optiplug.build_optimizer(twin, _adamw(False))
    data = TokenBlocks(n=8)
    for _step in range(3):
        for micro in range(2):
            batch = torch.stack([data[2 * micro + i]["input_ids"] for i in range(2)])
            model(input_ids=batch, labels=batch).loss.backward()
            twin(input_ids=batch, labels=batch).loss.backward()
        assert all(p.grad is None for p in model.parameters())  # stepped and freed at the boundary
        whole.step()
        whole.zero_grad()
        layerwise.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert stepper.grad_norm() > 0
    optiplug.disable_layerwise(layerwise)  # step() is its own again
    model(input_ids=batch, labels=batch).loss.backward()
    before = [p.detach().clone() for p in model.parameters()]
    layerwise.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_global_norm_is_each_steps_own_when_parameters_skip_a_step():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.SGD([a, b], lr=0.1)
    stepper = optiplug.enable_layerwise(optimizer)
    (2 * a).sum().backward()  # only a has a gradient: norm sqrt(3 * 2^2)
    optimizer.step()
    assert float(stepper.grad_norm()) == pytest.approx(12**0.5)
    (3 * b).sum().backward()  # only b: sqrt(4 * 3^2) = 6, not added to a's
    optimizer.step()
    assert float(stepper.grad_norm()) == pytest.approx(6.0)
    (a.sum() + 2 * b.sum()).backward()  # both: sqrt(3 + 16)
    assert float(stepper.grad_norm()) == pytest.approx(19**0.5)
    (a.sum() + 2 * b.sum()).backward()  # without step() in between, a parameter stepping again starts a new norm
    assert float(stepper.grad_norm()) == pytest.approx(19**0.5)
    assert torch.allclose(a, torch.ones(3) - 0.1 * (2 + 1 + 1))


def test_layerwise_resume_is_exact_and_the_checkpoint_holds_every_parameters_state(tmp_path):
    from transformers.trainer_pt_utils import LayerWiseDummyOptimizer

    steps, save_at = 8, 4
    full = _trainer(tmp_path / "full", _adamw(True), max_steps=steps, save_strategy="steps", save_steps=save_at)
    full.train()
    checkpoint = tmp_path / "full" / f"checkpoint-{save_at}"
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    n_params = len(list(full.model.parameters()))
    assert len(state["state"]) == n_params
    assert all(
        set(s) == {"step", "exp_avg", "exp_avg_sq"} and float(s["step"]) == save_at for s in state["state"].values()
    )
    # transformers' own layerwise optimizer saves nothing: a resume would restart every moment estimate
    assert LayerWiseDummyOptimizer(optimizer_dict={}, lr=1e-3).state_dict()["state"] == {}

    resumed = _trainer(tmp_path / "resumed", _adamw(True), max_steps=steps)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    after = {s: loss for s, loss in logged_losses(resumed).items() if s > save_at}
    reference = {s: loss for s, loss in logged_losses(full).items() if s > save_at}
    assert sorted(after) == [5, 6, 7, 8] and after == reference
    assert optiplug.layerwise_stepper(resumed.optimizer) is not None


# ---- refusals ---------------------------------------------------------------------------------


class _WholeOnlyConfig(optiplug.OptimizerConfig):
    name: Literal["whole_only"] = "whole_only"


def _build_whole_only(ctx, cfg):
    return torch.optim.SGD(ctx.param_groups(), lr=0.1)


class _WholeOnlyPlugin:
    @optiplug.hookimpl
    def register_optimizers(self, register):
        register(optiplug.OptimizerEntry(config=_WholeOnlyConfig, build=_build_whole_only))


def test_an_entry_not_declared_per_parameter_is_refused(temp_plugin, tmp_path):
    temp_plugin(_WholeOnlyPlugin(), "whole-only")
    message = (
        "whole_only with layerwise: true is not possible: its entry does not declare per_parameter=True (one "
        "parameter's update may depend on the others); set layerwise: false"
    )
    with pytest.raises(optiplug.ConfigError) as error:
        optiplug.build_optimizer(tiny_llama(), "whole_only", layerwise=True)
    assert str(error.value) == message
    trainer = _trainer(tmp_path, {"name": "whole_only", "layerwise": True})
    with pytest.raises(optiplug.ConfigError) as error:
        trainer.train()
    assert str(error.value) == message
    assert trainer.state.global_step == 0
    optiplug.build_optimizer(tiny_llama(), "whole_only")  # without layerwise it builds


def _args(**fields):
    """The TrainingArguments fields the checks read: DeepSpeed, FSDP, several processes and fp16 cannot be set
    up on this CPU-only machine."""
    values = dict(deepspeed=None, fsdp=None, world_size=1, fp16=False, gradient_accumulation_steps=1, max_grad_norm=0)
    return types.SimpleNamespace(**{**values, **fields})


@pytest.mark.parametrize(
    "args, message",
    [
        (
            {"world_size": 2},
            "adamw with layerwise: true steps each parameter during backward, before DDP has averaged its gradient "
            "across the 2 processes; set layerwise: false for distributed training",
        ),
        (
            {"world_size": 4, "deepspeed": "ds.json"},
            "adamw with layerwise: true steps each parameter during backward, before DeepSpeed has reduced and "
            "partitioned its gradient across the 4 processes; set layerwise: false for distributed training",
        ),
        (
            {"world_size": 2, "fsdp": "full_shard"},
            "adamw with layerwise: true steps each parameter during backward, before FSDP has reduce-scattered its "
            "gradient across the 2 processes; set layerwise: false for distributed training",
        ),
        (
            {"fp16": True},
            "adamw with layerwise: true cannot train in fp16, whose loss scaling unscales gradients only after "
            "backward; use bf16 or set layerwise: false",
        ),
    ],
    ids=["ddp", "deepspeed", "fsdp", "fp16"],
)
def test_distributed_and_fp16_are_refused_with_one_sentence(args, message):
    ctx = optiplug.BuildContext(model=tiny_llama(), args=_args(**args))
    with pytest.raises(optiplug.ConfigError) as error:
        build_from_entry(optiplug.get_entry("adamw"), ctx, optiplug.parse_optimizer(_adamw(True)))
    assert str(error.value) == message
    build_from_entry(optiplug.get_entry("adamw"), ctx, optiplug.parse_optimizer(_adamw(False)))  # fine without


def test_the_default_plugins_torch_optimizers_are_declared_per_parameter():
    builtin = {row.name for row in optiplug.list_optimizers() if row.plugin.startswith("optiplug:")}
    assert {"adamw", "adam", "sgd", "adagrad", "rmsprop", "radam", "nadam", "adamax"} <= builtin
    assert all(optiplug.get_entry(name).per_parameter for name in builtin)
    assert optiplug.parse_optimizer("adamw").layerwise is False  # off unless asked for


def test_tied_weights_and_gradient_checkpointing_step_once_like_the_whole_step():
    """A weight used twice (tied embedding and head) gets one hook call per backward, after both contributions;
    gradient checkpointing recomputes inside backward and still steps each parameter once."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def model():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)  # fmt: skip
        return LlamaForCausalLM(config)

    a, b = model(), model()
    assert a.lm_head.weight is a.model.embed_tokens.weight
    layerwise = optiplug.build_optimizer(a, "adamw", layerwise=True, lr=1e-2)
    whole = optiplug.build_optimizer(b, "adamw", lr=1e-2)
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    for checkpointing in (False, True):
        if checkpointing:
            for m in (a, b):
                m.gradient_checkpointing_enable()
                m.train()
        for _ in range(2):
            a(input_ids=x, labels=x).loss.backward()
            b(input_ids=x, labels=x).loss.backward()
            whole.step()
            whole.zero_grad()
            layerwise.step()
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_hooks_step_only_while_training_and_only_for_the_newest_optimizer(tmp_path):
    trainer = _trainer(tmp_path, _adamw(True), max_steps=3)
    trainer.train()
    model = trainer.model
    batch = torch.stack([TokenBlocks(n=4)[i]["input_ids"] for i in range(4)])
    before = [p.detach().clone() for p in model.parameters()]
    model(input_ids=batch, labels=batch).loss.backward()  # after train(): the hooks no longer step
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad()
    # a layerwise optimizer still alive, then a plain one built on the same model: only the plain one steps
    old = optiplug.build_optimizer(model, _adamw(True))
    plain = optiplug.build_optimizer(model, _adamw(False))
    model(input_ids=batch, labels=batch).loss.backward()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    plain.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert optiplug.layerwise_stepper(old) is not None  # it exists, but no longer owns the parameters' hooks


def test_hooks_running_on_several_threads_step_like_one_thread():
    """With ``device_map`` autograd runs each device's hooks on that device's thread: the stepper serialises them
    (an optimizer without step_parameters narrows its param_groups for each step, which two threads would mix)."""
    import threading

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(*(torch.nn.Linear(32, 32) for _ in range(16)))

    grads = [
        torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(model().parameters())
    ]
    results = []
    for threads in (1, 8):
        net = model()
        optimizer = torch.optim.AdamW(net.parameters(), lr=0.1)
        stepper = optiplug.enable_layerwise(optimizer)
        params = list(net.parameters())
        for _ in range(5):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            if threads == 1:
                for p in params:
                    stepper.on_grad_ready(p)
            else:
                workers = [
                    threading.Thread(
                        target=lambda part=params[i::threads], s=stepper: [s.on_grad_ready(p) for p in part]
                    )
                    for i in range(threads)
                ]
                for worker in workers:
                    worker.start()
                for worker in workers:
                    worker.join()
            optimizer.step()  # ends the round
        results.append((params, stepper.grad_norm()))
        assert all(p.grad is None for p in params) and len(optimizer.state) == len(params)
    (one, norm_one), (many, norm_many) = results
    assert all(torch.equal(a, b) for a, b in zip(one, many))
    assert torch.allclose(norm_one, norm_many)


def test_the_global_norm_adds_each_devices_part():
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    stepper = optiplug.enable_layerwise(optimizer)
    stepper._norm_squares = {torch.device("cpu"): torch.tensor(9.0), torch.device("cpu", 1): torch.tensor(16.0)}
    assert stepper.grad_norm().item() == 5.0
    stepper._norm_squares = {}
    assert stepper.grad_norm().item() == 0.0
