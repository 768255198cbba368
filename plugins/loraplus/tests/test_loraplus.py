"""LoRA+ on real peft LoRA models and real Trainer runs."""

from __future__ import annotations

import math

import pytest
from optiplug_loraplus import LoraPlusConfig, loraplus_groups

import optiplug
import optiplug.app
from optiplug.testing import TokenBlocks, logged_losses, tiny_llama, training_args

pytest.importorskip("peft")


def lora_llama(targets=("q_proj", "v_proj", "embed_tokens"), seed: int = 0, init: bool = True):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=init)
    return get_peft_model(tiny_llama(seed=seed), config)


def trainer(tmp_path, model, optimizer, scheduler, **args):
    return optiplug.OptiTrainer(
        model=model,
        args=training_args(tmp_path, **args),
        train_dataset=TokenBlocks(n=32, distinct=4),
        optimizer=optimizer,
        scheduler=scheduler,
    )


def test_registered_by_its_entry_point_with_analytic_state_bytes():
    from optiplug.registry import lookup

    row = lookup("optimizer", "loraplus")
    assert row.plugin == "optiplug-loraplus"
    model = lora_llama()
    shapes = optiplug.ParamShape.of_model(model)
    optimizer = optiplug.build_optimizer(model, "loraplus")
    import torch

    x = torch.randint(0, 128, (2, 8))
    model(input_ids=x, labels=x).loss.backward()
    optimizer.step()
    measured = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
    assert row.entry.state_bytes(shapes, row.entry.config()) == measured


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"lr_ratio": 0}, "optimizer.lr_ratio: Input should be greater than 0 (got 0)"),
        ({"embedding_lr": -1e-6}, "optimizer.embedding_lr: Input should be greater than 0 (got -1e-06)"),
        ({"betas": [0.9, 1.0]}, "optimizer.betas.1: Input should be less than 1 (got 1.0)"),
        ({"ratio": 4}, "optimizer.ratio: unknown field; check the spelling (`optiplug show NAME` lists the fields)"),
    ],
)
def test_invalid_config(fields, message):
    with pytest.raises(optiplug.ConfigError) as error:
        optiplug.app.RunConfig(optimizer={"name": "loraplus", **fields})
    assert str(error.value) == message


def test_refused_without_lora(tmp_path):
    run = trainer(tmp_path, tiny_llama(), "loraplus", "constant")
    with pytest.raises(optiplug.ConfigError) as error:
        run.train()
    assert str(error.value) == (
        "optimizer 'loraplus' trains LoRA adapters, but the model has none: set finetuning.type to 'lora' "
        "(or pass a peft LoRA model), or choose another optimizer"
    )
    assert run.state.global_step == 0


def test_refused_for_a_peft_adapter_that_is_not_lora():
    from peft import IA3Config, get_peft_model

    model = get_peft_model(
        tiny_llama(), IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    )
    entry = optiplug.get_entry("loraplus")
    with pytest.raises(optiplug.ConfigError) as error:
        entry.check(optiplug.BuildContext(model=model), entry.config())
    assert str(error.value) == (
        "optimizer 'loraplus' found no trainable LoRA B matrices (lora_B) in the model: it needs a LoRA "
        "adapter, not another peft adapter type"
    )


def test_groups_put_every_parameter_where_lora_plus_says():
    model = lora_llama()
    for name, param in model.named_parameters():  # a trained norm: 1-D, no decay -> lora_B_no_decay
        if name.endswith("model.norm.weight"):
            param.requires_grad_(True)
    cfg = LoraPlusConfig(lr=1e-3, lr_ratio=8, embedding_lr=1e-5, weight_decay=0.1)
    ctx = optiplug.BuildContext(model=model)
    groups = loraplus_groups(
        ctx.named_parameters(), ctx.decay_parameter_names(), cfg, ctx.param_groups(cfg.weight_decay)
    )
    names = {id(p): n for n, p in model.named_parameters()}
    members = {g["name"]: sorted(names[id(p)] for p in g["params"]) for g in groups}
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("lora_A", 1e-3, 0.1),
        ("lora_B", 8e-3, 0.1),
        ("lora_B_no_decay", 8e-3, 0.0),
        ("embedding", 1e-5, 0.1),
    ]
    assert len(members["lora_A"]) == 4 and all(".lora_A." in n for n in members["lora_A"])  # q, v x 2 layers
    assert len(members["lora_B"]) == 4 and all(".lora_B." in n for n in members["lora_B"])
    assert members["lora_B_no_decay"] == ["base_model.model.model.norm.weight"]
    assert members["embedding"] == [
        "base_model.model.model.embed_tokens.lora_embedding_A.default",
        "base_model.model.model.embed_tokens.lora_embedding_B.default",
    ]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for names_ in members.values() for n in names_}


def test_first_step_moves_b_by_lr_times_ratio(tmp_path):
    """With B = 0 at init, A gets no gradient on step 1 and AdamW moves each B entry by exactly its lr."""
    model = lora_llama(targets=("q_proj", "v_proj"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    run = trainer(tmp_path, model, {"name": "loraplus", "lr": 1e-3, "lr_ratio": 4}, "constant", max_steps=1)
    run.train()
    for name, param in model.named_parameters():
        if name in before:
            step = (param.detach() - before[name]).abs().max().item()
            expected = 4e-3 if ".lora_B." in name else 0.0
            assert step == pytest.approx(expected, rel=1e-3, abs=1e-9), name


def test_group_learning_rates_at_every_step_of_a_schedule(tmp_path):
    from transformers import TrainerCallback

    seen: list[dict[str, float]] = []

    class Record(TrainerCallback):
        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            seen.append({g["name"]: g["lr"] for g in optimizer.param_groups})

    steps, warmup = 8, 3
    run = trainer(
        tmp_path,
        lora_llama(),
        {"name": "loraplus", "lr": 2e-3, "lr_ratio": 16, "embedding_lr": 1e-4, "weight_decay": 0.01},
        {"name": "cosine", "warmup_steps": warmup},
        max_steps=steps,
    )
    run.add_callback(Record())
    run.train()
    base = {"lora_A": 2e-3, "lora_B": 3.2e-2, "embedding": 1e-4}
    assert len(seen) == steps
    for step, lrs in enumerate(seen):
        factor = step / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        assert set(lrs) == set(base)
        for group, lr in lrs.items():
            assert lr == pytest.approx(base[group] * factor, rel=1e-12, abs=1e-18), (step, group)
    logged = [h["learning_rate"] for h in run.state.log_history if "learning_rate" in h]
    assert logged == pytest.approx([lrs["lora_A"] for lrs in seen])
    losses = list(logged_losses(run).values())
    assert min(losses[-3:]) < losses[0]
