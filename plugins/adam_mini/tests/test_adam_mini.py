"""adam_mini: registration, the layout read from the model's config, refusals, quiet construction, state, resume."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from optiplug_adam_mini import AdamMiniConfig, Layout, block_kind, layout_of, state_bytes_for

import optiplug
import optiplug.app
from optiplug.testing import TokenBlocks, logged_losses, tiny_llama, training_args


def llama(seed: int = 0, **overrides):
    """``tiny_llama`` with config overrides (grouped-query heads, an explicit head_dim, tied head, ...)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    base = tiny_llama().config.to_dict()
    base.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**base))


def steps(optimizer, model, n: int = 2) -> None:
    data = TokenBlocks(n=8)
    import torch

    ids = torch.stack([data[i]["input_ids"] for i in range(4)])
    for _ in range(n):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.fixture
def log():
    """Records of the plugin's logger (``transformers.trainer.adam_mini``, which does not propagate to pytest's)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("transformers.trainer.adam_mini")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def refusal(model, args=None) -> str:
    entry = optiplug.get_entry("adam_mini")
    with pytest.raises(optiplug.ConfigError) as error:
        entry.check(optiplug.BuildContext(model=model, args=args), AdamMiniConfig())
    return str(error.value)


# ---- registration and config -------------------------------------------------------------------


def test_importing_the_plugin_and_listing_do_not_import_torch():
    code = (
        "import sys, optiplug, optiplug_adam_mini; names = [r.name for r in optiplug.list_optimizers()]; "
        "print('adam_mini' in names, 'torch' in sys.modules)"
    )
    env = {**os.environ, "OPTIPLUG_LOAD_PLUGINS": "optiplug-adam-mini"}  # this plugin only: others answer for theirs
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert done.stdout.strip() == "True False"


def test_registered_with_the_core_adam_fields():
    entry = optiplug.get_entry("adam_mini")
    assert entry.config is AdamMiniConfig and issubclass(AdamMiniConfig, optiplug.AdamFields)
    assert entry.requires == ("adam-mini",)
    cfg = AdamMiniConfig()
    assert (cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay) == (1e-3, (0.9, 0.999), 1e-8, 0.0)
    own = set(AdamMiniConfig.model_fields) - set(optiplug.OptimizerConfig.model_fields)
    assert own == {"lr", "betas", "eps", "weight_decay"}  # no hidden size or heads: they come from the model
    for bad in ({"lr": 0}, {"betas": (0.9, 1.0)}, {"eps": 0}, {"weight_decay": -1}, {"n_heads": 8}):
        with pytest.raises(ValueError):
            AdamMiniConfig(**bad)


# ---- the partition: adam-mini's own rules, the layout from the config ----------------------------


def test_name_rules_are_adam_minis():
    """The plugin's copy of the name fragments equals the installed adam-mini's, and each parameter's block kind
    is the branch adam-mini's step takes (read back from the state keys each branch creates)."""
    import torch
    from adam_mini import Adam_mini
    from optiplug_adam_mini import layout

    model = llama(num_key_value_heads=2, attention_bias=True)
    raw = Adam_mini(model.named_parameters(), dim=32, n_heads=4, n_kv_heads=2, verbose=False)
    assert raw.embd_names == layout.EMBD_NAMES and raw.output_names == layout.OUTPUT_NAMES
    assert raw.wqk_names == layout.WQK_NAMES and raw.wv_names == layout.WV_NAMES
    assert raw.attn_proj_names == layout.ATTN_PROJ_NAMES and raw.mlp_names == layout.MLP_NAMES
    assert raw.adam_block_names == layout.ADAM_BLOCK_NAMES
    raw.check_block_name = False
    steps(raw, model, 1)
    marker = {"v": "adam", "head_per_gpu": "heads", "neuron_per_gpu": "rows", "reduced": "one"}
    kinds = {}
    for name, param in model.named_parameters():
        [key] = [k for k in raw.state[param] if k in marker]
        kinds[name] = marker[key]
        assert block_kind(name) == marker[key], name
    assert set(kinds.values()) == {"adam", "heads", "rows", "one"}
    assert torch.is_tensor(raw.state[model.model.norm.weight]["vmean"])


def test_layout_is_read_from_the_models_config():
    assert layout_of(tiny_llama()) == Layout(hidden=32, heads=4, kv_heads=4, head_dim=8)
    assert layout_of(llama(num_key_value_heads=2)) == Layout(hidden=32, heads=4, kv_heads=2, head_dim=8)
    assert layout_of(llama(head_dim=16)) == Layout(hidden=32, heads=4, kv_heads=4, head_dim=16)


@pytest.mark.parametrize(
    ("overrides", "heads", "kv_heads"),
    [
        ({}, 4, 4),
        ({"num_key_value_heads": 2}, 4, 2),
        ({"head_dim": 16}, 4, 4),
        ({"head_dim": 4, "num_attention_heads": 2, "num_key_value_heads": 1}, 2, 1),
    ],
)
def test_one_second_moment_per_head_of_the_configs_layout(overrides, heads, kv_heads):
    """Query weights get one value per query head and key weights one per key head, also where the config's head_dim
    is not hidden / heads (adam-mini alone would cut those into blocks of hidden / heads rows)."""
    model = llama(**overrides)
    optimizer = optiplug.build_optimizer(model, "adam_mini")
    steps(optimizer, model, 1)
    attention = model.model.layers[0].self_attn
    assert tuple(optimizer.state[attention.q_proj.weight]["vmean"].shape) == (heads, 1)
    assert tuple(optimizer.state[attention.k_proj.weight]["vmean"].shape) == (kv_heads, 1)
    assert tuple(optimizer.state[attention.v_proj.weight]["vmean"].shape) == (attention.v_proj.weight.shape[0], 1)


def test_same_updates_as_adam_mini_itself():
    """Where adam-mini's own assumptions hold (head_dim = hidden / heads), the plugin changes no number."""
    from adam_mini import Adam_mini

    ours_model, raw_model = llama(seed=3), llama(seed=3)
    ours = optiplug.build_optimizer(ours_model, "adam_mini", lr=1e-2)
    raw = Adam_mini(raw_model.named_parameters(), lr=1e-2, dim=32, n_heads=4, n_kv_heads=4, verbose=False)
    steps(ours, ours_model, 3)
    steps(raw, raw_model, 3)
    for (name, a), (_, b) in zip(ours_model.named_parameters(), raw_model.named_parameters()):
        assert a.equal(b), name


def test_weight_decay_follows_the_trainers_split():
    model = tiny_llama()
    optimizer = optiplug.build_optimizer(model, "adam_mini", weight_decay=0.1)
    decay = optiplug.BuildContext(model=model).decay_parameter_names()
    names = [name for name, _ in model.named_parameters()]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1 if n in decay else 0.0 for n in names]
    assert {n for n in names if n not in decay} == {n for n in names if "norm" in n}


def test_layerwise_stepping_changes_nothing(tmp_path):
    """``per_parameter=True``: each parameter has its own group and state, so the core's layerwise stepping (each
    parameter stepped in its gradient hook) gives the same steps; clipping off, as layerwise clips per parameter."""
    runs = {}
    for layerwise in (False, True):
        trainer = optiplug.OptiTrainer(
            model=llama(num_key_value_heads=2),
            args=training_args(tmp_path / str(layerwise), max_steps=4, max_grad_norm=0.0),
            train_dataset=TokenBlocks(n=32, distinct=4),
            optimizer={"name": "adam_mini", "lr": 3e-3, "weight_decay": 0.1, "layerwise": layerwise},
        )
        trainer.train()
        runs[layerwise] = (logged_losses(trainer), trainer.model.state_dict())
    assert runs[True][0] == runs[False][0]
    assert all(runs[True][1][k].equal(v) for k, v in runs[False][1].items())


def test_optimizer_param_groups_reach_adam_minis_groups():
    """``optimizer.param_groups`` rules go through ``ctx.param_groups``; adam-mini's per-parameter groups keep them."""
    if "param_group_rules" not in optiplug.BuildContext.__dataclass_fields__:
        pytest.skip("this optiplug has no optimizer.param_groups")
    model = tiny_llama()
    rules = [{"match": r"\.mlp\.", "name": "mlp", "lr_scale": 0.5}, {"match": "embed", "weight_decay": 0.0}]
    optimizer = optiplug.build_optimizer(model, "adam_mini", lr=1e-2, weight_decay=0.1, param_groups=rules)
    by_name = {group["name"]: group for group in optimizer.param_groups}
    assert by_name["model.layers.0.mlp.up_proj.weight"]["lr"] == 5e-3
    assert by_name["model.layers.0.self_attn.q_proj.weight"]["lr"] == 1e-2
    assert by_name["model.embed_tokens.weight"]["weight_decay"] == 0.0
    assert by_name["model.layers.0.self_attn.q_proj.weight"]["weight_decay"] == 0.1
    assert by_name["model.norm.weight"]["weight_decay"] == 0.0
    steps(optimizer, model, 1)


def test_never_all_gathers_in_an_unsharded_launch():
    """adam-mini reduces norm blocks over ``torch.cuda.device_count()`` processes; here every process holds them whole."""
    assert optiplug.build_optimizer(tiny_llama(), "adam_mini").world_size == 1


# ---- refusals, each one sentence ------------------------------------------------------------------


def test_a_model_without_a_config_is_refused():
    import torch

    message = refusal(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    assert message == (
        "adam_mini: the model (Sequential) has no transformers config to read the hidden size and attention heads "
        "from (hidden_size, num_attention_heads); Adam-mini partitions transformer models only: pick another optimizer"
    )


def test_a_config_without_heads_is_refused():
    import torch

    model = torch.nn.Linear(4, 4)
    model.config = SimpleNamespace(hidden_size=4)
    assert refusal(model).startswith(
        "adam_mini: the model's config (SimpleNamespace) states no hidden_size and num_attention_heads (got 4 and None)"
    )


def test_fused_query_key_value_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=32))
    assert refusal(model) == (
        "adam_mini: no trainable query/key projection found (Adam-mini matches names containing k_proj, key, q_proj, "
        "query, wk, wq), so it cannot give attention one learning rate per head; this architecture names or fuses "
        "them differently (one qkv matrix): pick another optimizer"
    )


def test_a_query_weight_that_is_not_whole_heads_is_refused():
    model = tiny_llama()
    model.config.head_dim = 16
    model.config.num_attention_heads = 2
    model.config.num_key_value_heads = 2
    model.config.hidden_size = 24  # a config that does not describe the weights
    assert refusal(model).startswith(
        "adam_mini: model.layers.0.self_attn.q_proj.weight [32, 32] is a query/key weight by its name, but not whole "
        "attention heads of 16 rows x 24"
    )


def test_lora_adapters_are_refused():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert refusal(model) == (
        "adam_mini trains full weights: LoRA adapter matrices (lora_A, lora_B) are not the attention heads and rows "
        "it partitions (it fails on them at the first step); use full fine-tuning, or adamw or loraplus for adapters"
    )


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_sharded_deepspeed_is_refused(stage):
    args = SimpleNamespace(deepspeed={"zero_optimization": {"stage": stage}}, world_size=2)
    assert refusal(tiny_llama(), args) == (
        f"adam_mini cannot train under DeepSpeed ZeRO stage {stage}: ZeRO hands the optimizer flat 1-D partitions "
        "of the weights, and adam-mini's per-head and per-row blocks need the weight matrices (it fails at the first "
        "step); set zero_optimization.stage to 0, or train with FSDP2 (fsdp_config.version: 2), DDP or in one process"
    )


def test_fsdp1_is_refused_and_fsdp2_zero_stage_0_and_ddp_are_not():
    entry, cfg = optiplug.get_entry("adam_mini"), AdamMiniConfig()
    fsdp1 = SimpleNamespace(fsdp="full_shard", fsdp_config={"version": 1}, deepspeed=None, world_size=2)
    assert refusal(tiny_llama(), fsdp1) == (
        "adam_mini cannot train under FSDP version 1: it flattens each unit's weights into one 1-D parameter, and "
        "adam-mini's per-head and per-row blocks need the weight matrices; set fsdp_config.version to 2 (row shards), "
        "or train with DDP or in one process"
    )
    for args in (SimpleNamespace(deepspeed={"zero_optimization": {"stage": 0}}, world_size=2),
                 SimpleNamespace(deepspeed=None, fsdp=None, world_size=2),
                 SimpleNamespace(fsdp="full_shard", fsdp_config={"version": 2}, deepspeed=None, world_size=2),
                 SimpleNamespace(fsdp="full_shard", fsdp_config={"version": 2}, deepspeed=None, world_size=4)):  # fmt: skip
        entry.check(optiplug.BuildContext(model=tiny_llama(), args=args), cfg)  # 4 heads of 8 rows: shards of 8


def test_fsdp2_with_more_processes_than_whole_heads_fit_is_refused():
    fsdp2 = SimpleNamespace(fsdp="full_shard", fsdp_config={"version": 2}, deepspeed=None, world_size=8)
    assert refusal(tiny_llama(), fsdp2) == (
        "adam_mini under FSDP with 8 processes: model.layers.0.self_attn.q_proj.weight has 4 heads of 8 rows, and "
        "FSDP cuts its rows into shards of 4, inside a head, where adam-mini's one second moment per head would need "
        "rows of two processes; train with a number of processes whose shards hold whole heads (one that divides the "
        "number of heads), DDP or one process"
    )


# ---- quiet construction, state bytes, resume ------------------------------------------------------


def test_adam_mini_prints_and_the_plugin_does_not(capfd, log):
    from adam_mini import Adam_mini

    model = tiny_llama()
    steps(Adam_mini(model.named_parameters(), dim=32, n_heads=4), model, 1)
    assert "Adam-mini found" in capfd.readouterr().out  # what the plugin hides

    optimizer = optiplug.build_optimizer(model, "adam_mini")
    steps(optimizer, model, 2)
    assert capfd.readouterr() == ("", "")
    records = [(r.levelname, r.getMessage()) for r in log]
    assert ("DEBUG", "adam_mini: Adam-mini found the param block with name: model.embed_tokens.weight "
                     "torch.Size([128, 32])") in records  # fmt: skip
    assert any(level == "INFO" and "found 1 embedding layers, 1 output layers" in m for level, m in records)
    assert not any(level == "WARNING" for level, _ in records)


def test_a_tied_head_is_no_warning_and_a_missing_embedding_is(log):
    optiplug.build_optimizer(llama(tie_word_embeddings=True), "adam_mini")
    assert any("No output layer found" in r.getMessage() for r in log)
    assert not any(r.levelname == "WARNING" for r in log)  # adam-mini says to ignore it with a tied head
    log.clear()
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)
    optiplug.build_optimizer(model, "adam_mini")
    [warning] = [r.getMessage() for r in log if r.levelname == "WARNING"]
    assert warning.startswith("adam_mini: Warning by Adam-mini: No embedding layer found.")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("overrides", [{}, {"num_key_value_heads": 2, "head_dim": 16, "attention_bias": True}])
def test_state_bytes_equal_the_measured_state(dtype, overrides):
    """A first moment per weight and one second moment per block, in the weights' dtype; no tensor step counters."""
    import torch

    model = llama(**overrides).to(getattr(torch, dtype))
    optimizer = optiplug.build_optimizer(model, "adam_mini")
    steps(optimizer, model, 2)
    shapes = optiplug.ParamShape.of_model(model)
    measured = optiplug.optimizer_state_bytes(optimizer)
    assert measured == state_bytes_for(shapes, layout_of(model))
    weights = sum(s.numel * s.itemsize for s in shapes)
    assert weights < measured < 1.05 * weights  # about half of AdamW's two moments
    assert optiplug.adam_state_bytes(shapes) > 1.9 * measured


def test_resume_is_exact_with_weight_decay_and_grouped_heads(tmp_path):
    import torch

    def trainer(out: Path, **overrides):
        args = training_args(out, max_steps=6, **overrides)
        model = llama(num_key_value_heads=2, head_dim=16)
        return optiplug.OptiTrainer(model=model, args=args, train_dataset=TokenBlocks(n=32, distinct=4),
                                    optimizer={"name": "adam_mini", "lr": 3e-3, "weight_decay": 0.1})  # fmt: skip

    full = trainer(tmp_path / "full", save_strategy="steps", save_steps=3)
    full.train()
    reference = logged_losses(full)
    checkpoint = tmp_path / "full" / "checkpoint-3"
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert {"m", "vmean", "step", "head_per_gpu"} <= set(state["state"][1])  # q_proj: per-head second moments
    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    after = {step: loss for step, loss in logged_losses(resumed).items() if step > 3}
    assert after == {step: reference[step] for step in (4, 5, 6)}
    assert reference[6] < reference[1]


def test_the_example_trains_the_embedded_model_quietly(tmp_path, capfd):
    """``optiplug train examples/adam-mini.yaml`` (shortened), and its summary's measured state is the analytic one."""
    from transformers import AutoModelForCausalLM

    example = Path(__file__).resolve().parents[3] / "examples" / "adam-mini.yaml"
    out = tmp_path / "out"
    result = optiplug.app.train(
        example, [f"training.output_dir={out}", "training.max_steps=3", "training.disable_tqdm=true"]
    )
    assert result.summary["optimizer"]["name"] == "adam_mini" and len(result.losses) >= 1
    assert "Adam-mini" not in capfd.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings  # the embedded model: no separate output head
    assert result.summary["optimizer_state_bytes"] == state_bytes_for(
        optiplug.ParamShape.of_model(model), layout_of(model)
    )
