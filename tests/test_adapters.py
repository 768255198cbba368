"""Fine-tuning types on real models: freeze, LoRA through peft, PiSSA and its conversion, every optimizer with LoRA."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

import optiplug
import optiplug.app
from optiplug.app.adapters import (
    PISSA_CONVERTED_DIR,
    PISSA_INIT_DIR,
    PISSA_TRAINED_DIR,
    PissaConvertCallback,
    apply_finetuning,
    pissa_callbacks,
)
from optiplug.app.config import FinetuningConfig, validate_config
from optiplug.testing import TokenBlocks, logged_losses, tiny_llama, training_args

pytest.importorskip("peft")


def lora(**fields) -> FinetuningConfig:
    return FinetuningConfig(type="lora", **{"r": 4, **fields})


def lora_llama(seed: int = 0, **fields):
    return apply_finetuning(tiny_llama(seed=seed), lora(**fields))


def batch(seed: int = 5):
    import torch

    return torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    import torch

    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _schedule_for(optimizer) -> str | dict:
    """The optimizer's own scheduler when its entry brings one (schedule-free: constant), else cosine with warmup."""
    name = optimizer if isinstance(optimizer, str) else optimizer["name"]
    own = optiplug.get_entry(name).default_scheduler
    return own if own is not None else {"name": "cosine", "warmup_steps": 2}


def make_trainer(output_dir, model, optimizer="adamw", run_config=None, **args):
    """A trainer with the callbacks `optiplug train` adds for ``run_config``'s fine-tuning section."""
    trainer = optiplug.OptiTrainer(
        model=model,
        args=training_args(output_dir, **args),
        train_dataset=TokenBlocks(n=32, distinct=4),
        optimizer=optimizer,
        scheduler=_schedule_for(optimizer),
        run_config=run_config,
    )
    for callback in pissa_callbacks(trainer, run_config.finetuning) if run_config is not None else ():
        trainer.add_callback(callback)
    return trainer


# ---- the finetuning section -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            {"type": "lora", "pissa_convert": True},
            "finetuning: pissa_convert needs init 'pissa' or 'pissa_niter_N' (init is 'default')",
        ),
        (
            {"type": "lora", "init": "gaussian", "pissa_convert": True},
            "finetuning: pissa_convert needs init 'pissa' or 'pissa_niter_N' (init is 'gaussian')",
        ),
        (
            {"type": "lora", "init": "pissa_niter_0"},
            "finetuning.init: expected 'default', 'gaussian', 'pissa' or 'pissa_niter_N' with N a positive integer (got 'pissa_niter_0')",
        ),
        (
            {"type": "lora", "init": "svd"},
            "finetuning.init: expected 'default', 'gaussian', 'pissa' or 'pissa_niter_N' with N a positive integer (got 'svd')",
        ),
        ({"type": "full", "r": 16}, "finetuning: 'r' is only used with type 'lora'"),
        (
            {"type": "freeze", "trainable": ["norm"], "init": "pissa", "pissa_convert": True},
            "finetuning: 'init', 'pissa_convert' are only used with type 'lora'",
        ),
        ({"type": "lora", "trainable": ["norm"]}, "finetuning: 'trainable' is only used with type 'freeze'"),
        ({"type": "lora", "r": 0}, "finetuning.r: Input should be greater than 0 (got 0)"),
        ({"type": "lora", "dropout": 1.0}, "finetuning.dropout: Input should be less than 1 (got 1.0)"),
        (
            {"type": "lora", "target_modules": []},
            "finetuning.target_modules: expected a non-empty list of module names, a regex or 'all-linear'",
        ),
        (
            {"type": "lora", "target_modules": "(q|v_proj"},
            "finetuning.target_modules: '(q|v_proj' is not a valid regular expression: missing ), unterminated subpattern at position 0 (got '(q|v_proj')",
        ),
        (
            {"type": "lora", "rank": 8},
            "finetuning.rank: unknown field; check the spelling (`optiplug show NAME` lists the fields)",
        ),
        ({"type": "qlora"}, "finetuning.type: Input should be 'full', 'freeze' or 'lora' (got 'qlora')"),
    ],
)
def test_invalid_finetuning_sections(section, message):
    with pytest.raises(optiplug.ConfigError) as error:
        validate_config({"finetuning": section})
    assert str(error.value) == message


def test_a_lora_section_survives_a_round_trip_and_alpha_defaults_to_twice_r():
    config = validate_config({"finetuning": {"type": "lora", "r": 4, "init": "pissa_niter_4", "pissa_convert": True}})
    again = validate_config(config.model_dump())
    assert again.finetuning == config.finetuning and again.finetuning.lora_alpha == 8.0
    assert validate_config({}).finetuning.type == "full"


def test_missing_peft_is_one_line_naming_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # what `import peft` sees when it is not installed
    with pytest.raises(optiplug.MissingDependencyError) as error:
        apply_finetuning(tiny_llama(), lora())
    assert str(error.value) == (
        "finetuning.type 'lora' needs the package 'peft', which is not installed: pip install 'optiplug[lora]'"
    )


# ---- LoRA through peft ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        ("all-linear", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
        (["q_proj", "v_proj"], {"q_proj", "v_proj"}),
        ("down_proj", {"down_proj"}),  # a bare name is a name, not an anchored regex
        (r"model\.layers\.1\.mlp\.(up|down)_proj", {"up_proj", "down_proj"}),
    ],
)
def test_lora_wraps_the_target_modules_and_trains_only_the_adapter(targets, expected):
    model = lora_llama(target_modules=targets)
    assert optiplug.BuildContext(model=model).uses_adapters
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable} == expected
    assert not any("lm_head" in name for name in trainable)
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.init_lora_weights) == (4, 8.0, True)


def test_lora_target_that_matches_nothing():
    with pytest.raises(optiplug.ConfigError) as error:
        lora_llama(target_modules=["query_key_value"])
    assert str(error.value) == (
        "finetuning.target_modules ['query_key_value'] matches no Linear/Embedding module; available: down_proj, "
        "embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj (or 'all-linear')"
    )


def test_default_lora_starts_as_the_base_model_and_gaussian_too():
    ids = batch()
    reference = logits(tiny_llama(), ids)
    for init in ("default", "gaussian"):
        assert logits(lora_llama(init=init), ids).equal(reference), init


# ---- freeze -----------------------------------------------------------------------------------


def test_freeze_trains_only_the_named_modules(tmp_path):
    model = apply_finetuning(tiny_llama(), {"type": "freeze", "trainable": [r"layers\.1\.mlp\.", r"^model\.norm\."]})
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.norm.weight",
    }
    run = make_trainer(tmp_path, model, {"name": "adamw", "lr": 1e-2, "weight_decay": 0.1}, max_steps=4)
    run.train()
    for name, param in model.named_parameters():
        changed = not param.detach().equal(before[name])
        assert changed == (name in trainable), name


def test_freeze_pattern_that_matches_nothing():
    with pytest.raises(optiplug.ConfigError) as error:
        apply_finetuning(tiny_llama(), {"type": "freeze", "trainable": ["layers.1", "transformer.h"]})
    assert str(error.value) == (
        "finetuning.trainable: 'transformer.h' matches no parameter name; names look like: "
        "model.embed_tokens.weight, model.layers.0.self_attn.q_proj.weight, lm_head.weight"
    )


# ---- PiSSA and its conversion -----------------------------------------------------------------


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2"])
def test_pissa_converted_adapter_on_the_original_base_reproduces_the_trained_model(init, tmp_path):
    from peft import PeftModel

    original = {name: p.detach().clone() for name, p in tiny_llama().named_parameters()}
    config = validate_config({"finetuning": {"type": "lora", "r": 4, "init": init, "pissa_convert": True}})
    model = apply_finetuning(tiny_llama(), config.finetuning)
    residual = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert not residual.equal(original["model.layers.0.self_attn.q_proj.weight"])  # PiSSA moved the principal part

    run = make_trainer(tmp_path, model, {"name": "adamw", "lr": 1e-2}, run_config=config, max_steps=4)
    assert [type(c) for c in run.callback_handler.callbacks].count(
        PissaConvertCallback
    ) == 1  # added as optiplug train adds it
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    run.train()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("pissa")) == [
        PISSA_CONVERTED_DIR,
        PISSA_INIT_DIR,
        PISSA_TRAINED_DIR,
    ]
    # the conversion leaves the trained model as it was: one adapter, the same trainable flags
    assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags

    ids = batch()
    trained = logits(model, ids)
    base = tiny_llama()
    converted = PeftModel.from_pretrained(base, tmp_path / PISSA_CONVERTED_DIR)
    assert converted.peft_config["default"].r == 8 and converted.peft_config["default"].init_lora_weights is True
    got = logits(converted, ids)
    assert (got - trained).abs().max().item() < 1e-5 * trained.abs().max().item()
    assert not got.equal(logits(tiny_llama(), ids))  # training changed something
    for name, param in converted.get_base_model().named_parameters():
        if "lora_" not in name:  # the original weights, untouched by loading the converted adapter
            assert param.detach().equal(original[name.replace(".base_layer", "")]), name

    initial = PeftModel.from_pretrained(tiny_llama(), tmp_path / PISSA_INIT_DIR)
    assert initial.peft_config["default"].init_lora_weights is True  # loads without a new decomposition


def test_pissa_trained_adapter_reloads_onto_the_original_base_by_redoing_the_decomposition(tmp_path):
    from peft import PeftModel

    config = validate_config({"finetuning": {"type": "lora", "r": 4, "init": "pissa", "pissa_convert": True}})
    model = apply_finetuning(tiny_llama(), config.finetuning)
    make_trainer(tmp_path, model, {"name": "adamw", "lr": 1e-2}, run_config=config, max_steps=3).train()
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / PISSA_TRAINED_DIR)
    ids = batch()
    assert logits(reloaded, ids).equal(logits(model, ids))  # full SVD is deterministic


def test_pissa_convert_after_resuming_in_a_fresh_directory_uses_the_true_initial_adapter(tmp_path):
    from peft import PeftModel

    config = validate_config({"finetuning": {"type": "lora", "r": 4, "init": "pissa", "pissa_convert": True}})
    first = apply_finetuning(tiny_llama(), config.finetuning)
    make_trainer(
        tmp_path / "a",
        first,
        {"name": "adamw", "lr": 1e-2},
        run_config=config,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
    ).train()
    second = apply_finetuning(tiny_llama(), config.finetuning)
    resumed = make_trainer(tmp_path / "b", second, {"name": "adamw", "lr": 1e-2}, run_config=config, max_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    ids = batch()
    for run in ("a", "b"):
        converted = PeftModel.from_pretrained(tiny_llama(), tmp_path / run / PISSA_CONVERTED_DIR)
        assert (logits(converted, ids) - logits(first, ids)).abs().max().item() < 1e-5, run


def test_pissa_convert_refuses_a_model_that_is_not_pissa(tmp_path):
    config = validate_config({"finetuning": {"type": "lora", "r": 4, "init": "pissa", "pissa_convert": True}})
    with pytest.raises(optiplug.ConfigError) as error:
        make_trainer(tmp_path, lora_llama(), run_config=config)
    assert str(error.value) == "pissa_convert needs a LoRA adapter initialised with PiSSA (its init is 'True')"
    with pytest.raises(optiplug.ConfigError) as error:
        make_trainer(tmp_path, tiny_llama(), run_config=config)
    assert str(error.value) == (
        "pissa_convert needs a LoRA model with adapter 'default' (apply finetuning.type 'lora' with init 'pissa' "
        "first), got LlamaForCausalLM"
    )


def test_no_conversion_callback_unless_asked(tmp_path):
    for section in ({"type": "lora", "init": "pissa"}, {"type": "full"}, None):
        config = validate_config({"finetuning": section} if section else {})
        run = make_trainer(tmp_path, lora_llama(), run_config=config)
        assert not any(isinstance(c, PissaConvertCallback) for c in run.callback_handler.callbacks)


# ---- every registered optimizer with LoRA -----------------------------------------------------


def _with_lora(name: str):
    """One optimizer, skipped with its own check's reason where it refuses a LoRA model."""
    from transformers import TrainingArguments

    entry = optiplug.get_entry(name)
    try:
        entry.check_requires()
        if entry.check is not None:
            schedule = entry.default_scheduler or "cosine"  # what make_trainer trains it with
            args = TrainingArguments(
                output_dir="/tmp/optiplug-probe", use_cpu=True, report_to="none", lr_scheduler_type=schedule
            )
            entry.check(optiplug.BuildContext(model=lora_llama(), args=args), entry.config())
    except optiplug.OptiplugError as error:
        return pytest.param(name, marks=pytest.mark.skip(reason=f"refuses LoRA: {error}"))
    return name


# optiplug-pytorch-optimizer's ~110 optimizers: a fixed sample here (as in test_every_optimizer.py)
BRIDGE, BRIDGE_SAMPLE = "optiplug-pytorch-optimizer", {"po_lion", "po_muon", "po_prodigy", "po_soap"}


def every_optimizer_with_lora():
    rows = optiplug.list_optimizers()
    return [_with_lora(row.name) for row in rows if row.plugin != BRIDGE or row.name in BRIDGE_SAMPLE]


@pytest.mark.parametrize("name", every_optimizer_with_lora())
def test_smoke_every_optimizer_trains_a_lora_model(name, tmp_path):
    model = lora_llama()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    run = make_trainer(tmp_path, model, name, max_steps=10)
    run.train()
    losses = list(logged_losses(run).values())
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses)
    assert min(losses[-3:]) < losses[0], f"{name}: loss did not decrease: {losses}"
    for n, p in model.named_parameters():
        if n in frozen:
            assert p.detach().equal(frozen[n]), f"{name} changed the frozen base weight {n}"


@pytest.mark.parametrize("name", every_optimizer_with_lora())
def test_resume_every_optimizer_with_lora_reproduces_the_uninterrupted_run(name, tmp_path):
    import torch

    steps = 6
    full = make_trainer(
        tmp_path / "full", lora_llama(), name, max_steps=steps, save_strategy="steps", save_steps=steps // 2
    )
    full.train()
    reference = logged_losses(full)
    checkpoint = Path(tmp_path / "full" / f"checkpoint-{steps // 2}")
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    torch.load(checkpoint / "optimizer.pt", weights_only=True)

    resumed = make_trainer(tmp_path / "resumed", lora_llama(), name, max_steps=steps)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    after = {step: loss for step, loss in logged_losses(resumed).items() if step > steps // 2}
    assert sorted(after) == list(range(steps // 2 + 1, steps + 1))
    for step, loss in after.items():
        assert loss == reference[step], f"{name}: step {step}: resumed {loss} != uninterrupted {reference[step]}"


def test_every_optimizer_says_whether_it_trains_lora():
    """Each entry's check either accepts a LoRA model or refuses it with one sentence; none is silent about it."""
    verdicts = {}
    for row in optiplug.list_optimizers():
        if row.plugin == BRIDGE and row.name not in BRIDGE_SAMPLE:
            continue  # the bridge's own refusals (po_ranger21 needs num_iterations) are its tests' business
        param = _with_lora(row.name)
        verdicts[row.name] = "accepts" if isinstance(param, str) else param.marks[0].kwargs["reason"]
    assert verdicts["adamw"] == "accepts"
    if "loraplus" in verdicts:
        assert verdicts["loraplus"] == "accepts"
    for name, verdict in verdicts.items():
        assert verdict == "accepts" or ("\n" not in verdict and "adapter" in verdict), (name, verdict)
    for name in (n for n in verdicts if n.startswith("galore")):
        assert verdicts[name] != "accepts", f"{name} must refuse LoRA models (as LLaMA-Factory does)"


def test_badam_with_lora_trains_only_the_lora_parameters_of_the_active_block(tmp_path):
    if "badam" not in {row.name for row in optiplug.list_optimizers()}:
        pytest.skip("optiplug-badam is not installed")
    model = lora_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run = make_trainer(tmp_path, model, {"name": "badam", "lr": 1e-2, "switch_every": 50}, max_steps=3)
    run.train()
    changed = {n for n, p in model.named_parameters() if not p.detach().equal(before[n])}
    assert changed, "badam trained nothing"
    assert all(".layers.0." in n and ".lora_" in n for n in changed), sorted(changed)
    assert {n for n in changed if ".lora_B." in n} == {n for n in before if ".layers.0." in n and ".lora_B." in n}


# ---- optiplug train -----------------------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_optiplug_train_pissa_run_writes_a_converted_adapter_for_the_saved_original_base(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from optiplug.app.adapters import BASE_MODEL_DIR
    from optiplug.app.run import _load_model

    result = optiplug.app.train(
        EXAMPLES / "lora-pissa.yaml",
        [f"training.output_dir={tmp_path}", "training.max_steps=3", "training.logging_steps=1",
         "data.max_blocks=32", "data.block_size=32", "finetuning.init=pissa", "finetuning.r=4"],
    )  # fmt: skip
    out = result.output_dir
    for sub in ("", PISSA_INIT_DIR, PISSA_TRAINED_DIR, PISSA_CONVERTED_DIR):
        assert (out / sub / "adapter_model.safetensors").is_file(), sub
    assert (out / "summary.json").is_file() and not (out / "model.safetensors").exists()
    assert result.summary["trainable_parameters"] < result.summary["parameters"] / 10

    original = _load_model(optiplug.app.ModelConfig(), seed=42)
    base = AutoModelForCausalLM.from_pretrained(out / BASE_MODEL_DIR)
    assert base.state_dict().keys() == original.state_dict().keys()
    for name, tensor in base.state_dict().items():
        assert tensor.equal(original.state_dict()[name]), name  # the original weights, not PiSSA's residual

    ids = batch() % 2048
    # the run's own adapter re-decomposes the original base (full SVD): the trained PiSSA model
    trained = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / BASE_MODEL_DIR), out), ids)
    converted = logits(PeftModel.from_pretrained(base, out / PISSA_CONVERTED_DIR), ids)
    assert (converted - trained).abs().max().item() < 1e-5 * trained.abs().max().item()
    assert not converted.equal(logits(original, ids))
