"""optimizer.param_groups: parameter groups by name, for every optimizer that takes its groups from ctx.param_groups."""

from __future__ import annotations

from typing import Literal

import pytest

import optiplug
import optiplug.app
from optiplug.params import GROUP_KEY
from optiplug.testing import TokenBlocks, logged_losses, tiny_llama, training_args

TWO_GROUPS = [{"match": "embed_tokens", "lr_scale": 0.1}, {"match": "lm_head", "weight_decay": 0.0}]


def _groups(optimizer):
    return [(g[GROUP_KEY], len(g["params"]), g["lr"], g["weight_decay"]) for g in optimizer.param_groups]


def test_python_api_builds_the_groups_in_order_with_their_rates_and_decay():
    model = tiny_llama()
    optimizer = optiplug.build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1, param_groups=TWO_GROUPS)
    # unmatched first (decay: 14 matrices, no-decay: 5 norms), then each entry's decay / no-decay groups
    assert _groups(optimizer) == [
        ("default", 14, 1e-3, 0.1),
        ("default", 5, 1e-3, 0.0),
        ("embed_tokens", 1, pytest.approx(1e-4), 0.1),
        ("lm_head", 1, 1e-3, 0.0),
    ]
    embed = dict(model.named_parameters())["model.embed_tokens.weight"]
    assert optimizer.param_groups[2]["params"] == [embed]


def test_other_options_and_absolute_lr_reach_the_group_and_yaml_lists_become_tuples():
    optimizer = optiplug.build_optimizer(
        tiny_llama(), "adamw", lr=1e-3, param_groups=[{"match": "lm_head", "lr": 5e-3, "betas": [0.8, 0.9]}]
    )
    head = optimizer.param_groups[-1]
    assert (head[GROUP_KEY], head["lr"], head["betas"]) == ("lm_head", 5e-3, (0.8, 0.9))
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.999)


def test_a_groups_weight_decay_spares_its_norms_unless_decay_all():
    model = tiny_llama()
    kept = optiplug.build_optimizer(
        model, "adamw", weight_decay=0.0, param_groups=[{"match": r"layers\.0\.", "weight_decay": 0.2}]
    )
    assert [(label, n, wd) for label, n, _, wd in _groups(kept) if label != "default"] == [
        (r"layers\.0\.", 7, 0.2),
        (r"layers\.0\.", 2, 0.0),  # input_layernorm, post_attention_layernorm: the no-decay rule holds
    ]
    every = optiplug.build_optimizer(
        model, "adamw", param_groups=[{"match": r"layers\.0\.", "weight_decay": 0.2, "decay_all": True}]
    )
    assert [(n, wd) for label, n, _, wd in _groups(every) if label != "default"] == [(7, 0.2), (2, 0.2)]


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        (
            [{"match": "embed_token_s"}],
            "optimizer.param_groups[0]: match 'embed_token_s' matches no trainable parameter (a regex searched in "
            "each name); the names are: model.embed_tokens.weight, model.layers.*.self_attn.q_proj.weight, "
            "model.layers.*.self_attn.k_proj.weight, model.layers.*.self_attn.v_proj.weight, "
            "model.layers.*.self_attn.o_proj.weight, model.layers.*.mlp.gate_proj.weight, "
            "model.layers.*.mlp.up_proj.weight, model.layers.*.mlp.down_proj.weight, "
            "model.layers.*.input_layernorm.weight, model.layers.*.post_attention_layernorm.weight, "
            "model.norm.weight, lm_head.weight",
        ),
        (
            [{"match": "embed"}, {"match": "embed_tokens", "lr": 1e-2}],
            "optimizer.param_groups[1]: match 'embed_tokens' matches only parameters that param_groups[0] "
            "(match 'embed') already took (first match wins): put the narrower pattern first",
        ),
        (
            [{"match": "embed", "momentum": 0.9}],
            "optimizer.param_groups[0].momentum: optimizer 'adamw' takes no per-group option 'momentum' "
            "(it takes: amsgrad, betas, decoupled_weight_decay, eps, lr, maximize, weight_decay)",
        ),
        (
            [{"match": "norm", "weight_decay": 0.1}],
            "optimizer.param_groups[0]: match 'norm' sets weight_decay=0.1 but matches only parameters the default "
            "no-decay rule exempts (biases, norms): set decay_all: true to decay them",
        ),
    ],
)
def test_user_errors_say_what_and_what_to_do(rules, message):
    with pytest.raises(optiplug.ConfigError) as info:
        optiplug.build_optimizer(tiny_llama(), "adamw", param_groups=rules)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ([{"match": "a", "lr": 1, "lr_scale": 2}], "optimizer.param_groups.0: set lr or lr_scale, not both"),
        ([{"match": "("}], "optimizer.param_groups.0: match '(' is not a valid regex: missing ), unterminated"),
        ([{"match": "a"}, {"match": "a"}], "optimizer.param_groups: two entries are labelled 'a'; give them distinct"),
        ([{"match": "a", "lr_scale": 0}], "optimizer.param_groups.0.lr_scale: Input should be greater than 0 (got 0)"),
        ([{"match": "a", "params": 1}], "optimizer.param_groups.0: 'params' is chosen by match; remove it"),
    ],
)
def test_config_errors_before_any_model(rules, message):
    with pytest.raises(optiplug.ConfigError, match="^" + __import__("re").escape(message)):
        optiplug.parse_optimizer("sgd", param_groups=rules)


class _OwnGroupsConfig(optiplug.OptimizerConfig):
    name: Literal["own_groups"] = "own_groups"


def _own_groups(ctx, cfg):
    import torch

    return torch.optim.SGD([p for _, p in ctx.named_parameters()], lr=0.1)


class _MergingConfig(optiplug.OptimizerConfig):
    name: Literal["merging"] = "merging"


def _merging(ctx, cfg):
    import torch

    groups = ctx.param_groups(0.0)
    return torch.optim.SGD([p for g in groups for p in g["params"]], lr=0.1)


class _Plugin:
    @optiplug.hookimpl
    def register_optimizers(self, register):
        register(optiplug.OptimizerEntry(config=_OwnGroupsConfig, build=_own_groups))
        register(optiplug.OptimizerEntry(config=_MergingConfig, build=_merging))


def test_an_optimizer_outside_the_contract_is_refused_not_silently_ungrouped(temp_plugin):
    temp_plugin(_Plugin(), "own-groups-plugin")
    model = tiny_llama()
    assert optiplug.build_optimizer(model, "own_groups") is not None  # without param_groups it is fine
    with pytest.raises(optiplug.ConfigError) as info:
        optiplug.build_optimizer(model, "own_groups", param_groups=TWO_GROUPS)
    assert str(info.value) == (
        "optimizer 'own_groups' builds its own parameter groups (not with ctx.param_groups), so "
        "optimizer.param_groups cannot apply to it: remove optimizer.param_groups or choose another optimizer"
    )
    with pytest.raises(optiplug.ConfigError, match=r"^optimizer 'merging' regroups the parameters it gets from ctx"):
        optiplug.build_optimizer(model, "merging", param_groups=TWO_GROUPS)


def _every_lambda_scheduler():
    return [r.name for r in optiplug.list_schedulers() if r.plugin.startswith("optiplug:")]


FOLLOW_A_METRIC = {"reduce_lr_on_plateau", "greedy"}  # stepped with the evaluation metric, as the Trainer does


@pytest.mark.parametrize("name", _every_lambda_scheduler())
def test_every_builtin_schedule_keeps_the_groups_in_proportion(name):
    model = tiny_llama()
    optimizer = optiplug.build_optimizer(model, "sgd", lr=0.5, momentum=0.0, param_groups=TWO_GROUPS)
    if name == "adafactor":  # it reports the adafactor optimizer's own relative-step rate, and sets none
        with pytest.raises(optiplug.ConfigError, match="the optimizer is SGD: choose another scheduler"):
            optiplug.build_scheduler(optimizer, name, num_training_steps=20)
        return
    scheduler = optiplug.build_scheduler(optimizer, name, num_training_steps=20)
    for _ in range(20):
        optimizer.step()
        if name in FOLLOW_A_METRIC:
            scheduler.step(1.0)  # a flat metric: the rate is cut every patience+1 steps
        else:
            scheduler.step()
        base, embed = optimizer.param_groups[0]["lr"], optimizer.param_groups[2]["lr"]
        assert embed == pytest.approx(0.1 * base, rel=1e-9, abs=1e-15), name


def test_trainer_logs_each_groups_rate_and_trains_with_it(tmp_path):
    trainer = optiplug.OptiTrainer(
        model=tiny_llama(),
        args=training_args(tmp_path, max_steps=6),
        train_dataset=TokenBlocks(32, distinct=4),
        optimizer={"name": "adamw", "lr": 1e-2, "param_groups": [{**TWO_GROUPS[0], "name": "embed"}, TWO_GROUPS[1]]},
        scheduler={"name": "linear", "warmup_steps": 2},
    )
    trainer.train()
    records = [r for r in trainer.state.log_history if "loss" in r]
    assert len(records) == 6
    for record in records:
        assert record["lr/default"] == record["learning_rate"]
        assert record["lr/lm_head"] == record["learning_rate"]
        assert record["lr/embed"] == pytest.approx(0.1 * record["learning_rate"])
    assert [r["lr/embed"] for r in records[:3]] == pytest.approx([0.0, 5e-4, 1e-3])  # warmup to 0.1 x 1e-2
    losses = list(logged_losses(trainer).values())
    assert losses[-1] < losses[0]


def test_trainer_refuses_a_pattern_that_matches_nothing_before_training(tmp_path):
    trainer = optiplug.OptiTrainer(
        model=tiny_llama(),
        args=training_args(tmp_path),
        train_dataset=TokenBlocks(8),
        optimizer={"name": "adamw", "param_groups": [{"match": "embedding"}]},
    )
    with pytest.raises(optiplug.ConfigError, match=r"^optimizer.param_groups\[0\]: match 'embedding' matches no"):
        trainer.check_optimizer()
    assert trainer.state.global_step == 0


def test_yaml_and_command_line_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "optimizer:\n  name: adamw\n  param_groups:\n    - {match: embed_tokens, lr_scale: 0.1}\n"
        "    - match: lm_head\n      weight_decay: 0.0\n"
    )
    config = optiplug.app.load_config(str(path))
    assert [(r.match, r.lr_scale, r.weight_decay) for r in config.optimizer.param_groups] == [
        ("embed_tokens", 0.1, None),
        ("lm_head", None, 0.0),
    ]
    config = optiplug.app.load_config(str(path), ["optimizer.param_groups=[{match: lm_head, lr: 1.0e-2, eps: 1.0e-6}]"])
    (rule,) = config.optimizer.param_groups
    assert (rule.match, rule.lr, rule.options) == ("lm_head", 1e-2, {"lr": 1e-2, "eps": 1e-6})


def test_the_plugin_guides_contract_example_splits_and_keeps_the_users_groups(temp_plugin):
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "writing-a-plugin.md").read_text()
    source = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "def build_split" in b)
    namespace: dict = {"optiplug": optiplug}
    exec(compile(source, "writing-a-plugin.md", "exec"), namespace)

    class SplitConfig(optiplug.OptimizerConfig):
        name: Literal["split_sgd"] = "split_sgd"
        lr: float = 0.1
        weight_decay: float = 0.01

    class Plugin:
        @optiplug.hookimpl
        def register_optimizers(self, register):
            register(optiplug.OptimizerEntry(config=SplitConfig, build=namespace["build_split"]))

    temp_plugin(Plugin(), "split-plugin")
    optimizer = optiplug.build_optimizer(
        tiny_llama(), "split_sgd", param_groups=[{"match": "layers\\.1\\.", "lr": 0.5}]
    )
    rows = [(g[GROUP_KEY], len(g["params"]), g["lr"], g["momentum"], g["weight_decay"]) for g in optimizer.param_groups]
    assert rows == [
        ("default", 9, 0.1, 0.9, 0.01),  # embedding, layer 0's seven matrices, lm_head
        ("default", 3, 0.1, 0.0, 0.0),  # layer 0's norms, the final norm
        (r"layers\.1\.", 7, 0.5, 0.9, 0.01),
        (r"layers\.1\.", 2, 0.5, 0.0, 0.0),
    ]
