"""``optiplug estimate``: analytic optimizer state equals what a real optimizer holds, and the 7B ratios."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Literal

import pytest

import optiplug
import optiplug.app
from optiplug import optimizer_state_bytes
from optiplug.app.estimate import Estimate, estimate, format_bytes
from optiplug.testing import TokenBlocks, tiny_llama, training_args

LLAMA_7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
)


def _tensors() -> int:
    return len(list(tiny_llama().parameters()))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A local model directory holding the config of ``optiplug.testing.tiny_llama``."""
    path = tmp_path_factory.mktemp("tiny")
    tiny_llama().config.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama7b_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("llama7b")
    LlamaConfig(**LLAMA_7B).save_pretrained(path)
    return path


def _run(model_dir: Path, **sections) -> optiplug.app.RunConfig:
    sections.setdefault("model", {"name_or_path": str(model_dir)})
    return optiplug.app.RunConfig(**sections)


def _by_name(rows: list[Estimate]) -> dict[str, Estimate]:
    return {row.optimizer: row for row in rows}


# ---- every registered optimizer: estimate == measured after real steps ----------------------


LORA = {"type": "lora", "r": 4}


def _model(finetuning: dict):
    from optiplug.app.adapters import apply_finetuning

    return apply_finetuning(tiny_llama(), finetuning)


def _accepted_finetuning(name: str, tmp_path: Path) -> dict:
    """Full fine-tuning, or LoRA for an entry whose ``check`` wants adapters; skip when the check refuses both."""
    entry = optiplug.get_entry(name)
    reasons = []
    for finetuning in ({"type": "full"}, LORA):
        if entry.check is None:
            return finetuning
        own = {"lr_scheduler_type": entry.default_scheduler} if entry.default_scheduler else {}
        ctx = optiplug.BuildContext(model=_model(finetuning), args=training_args(tmp_path, **own))
        try:
            entry.check(ctx, entry.config())
            return finetuning
        except optiplug.ConfigError as error:
            reasons.append(f"{finetuning['type']}: {error}")
    pytest.skip(f"{name} cannot run here ({'; '.join(reasons)})")  # e.g. an 8-bit optimizer on a CPU


def _stepped_optimizer(name: str, finetuning: dict, tmp_path: Path):
    """The optimizer ``name`` after two real training steps on ``tiny_llama``.

    Entries with callbacks or patches run inside an ``OptiTrainer`` (they need one); the others
    in a plain loop, which is much faster.
    """
    entry = optiplug.get_entry(name)
    data = TokenBlocks(n=8)
    model = _model(finetuning)
    if entry.callbacks is None and entry.patches is None:
        import torch

        optimizer = optiplug.build_optimizer(model, name)
        ids = torch.stack([data[i]["input_ids"] for i in range(4)])
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return optimizer
    trainer = optiplug.OptiTrainer(
        model=model, args=training_args(tmp_path, max_steps=2, logging_steps=10), train_dataset=data, optimizer=name
    )
    trainer.train()
    from optiplug import unwrap_optimizer

    return unwrap_optimizer(trainer.optimizer)


# optiplug-pytorch-optimizer's ~110 bridged optimizers are checked against real steps by its own tests (some,
# like po_adashift, grow their state over many steps, so two steps would not show their peak); a sample runs here.
BRIDGE, BRIDGE_SAMPLE = "optiplug-pytorch-optimizer", {"po_lion", "po_muon", "po_prodigy", "po_soap", "po_racs"}


@pytest.mark.parametrize(
    "name", [row.name for row in optiplug.list_optimizers() if row.plugin != BRIDGE or row.name in BRIDGE_SAMPLE]
)
def test_estimated_state_equals_a_real_optimizers_state(name, tiny_dir, tmp_path):
    if optiplug.get_entry(name).state_bytes is None:  # measured on the meta model, or unknown: never a guess
        [row] = estimate(_run(tiny_dir, optimizer=name))
        if row.state_bytes is None:  # unknown only where the plugin says why, never by accident
            assert name in _unknown_by_design(), f"{name}: no state_bytes and not measured on meta"
            assert row.total_bytes is None and row.state_source is None
            return
        assert row.state_source == "measured"
    finetuning = _accepted_finetuning(name, tmp_path)
    [row] = estimate(_run(tiny_dir, optimizer=name, finetuning=finetuning))
    measured = optimizer_state_bytes(_stepped_optimizer(name, finetuning, tmp_path))
    assert measured > 0 or row.state_bytes == 0, f"{name}: no optimizer state after two steps"
    assert row.state_bytes == measured, (
        f"{name} ({finetuning['type']}): estimated {row.state_bytes} B, measured {measured} B"
    )


def test_estimate_of_the_meta_model_matches_the_real_model(tiny_dir):
    model = tiny_llama()
    [row] = estimate(_run(tiny_dir, optimizer="sgd"))
    params = list(model.parameters())
    assert row.total_params == row.trainable_params == sum(p.numel() for p in params)
    assert row.weights_bytes == row.gradient_bytes == 4 * row.total_params
    assert row.state_bytes == row.weights_bytes  # one momentum buffer per parameter
    assert row.total_bytes == 3 * row.weights_bytes


def test_bfloat16_halves_weights_gradients_and_adamw_state(tiny_dir):
    [full] = estimate(_run(tiny_dir))
    [half] = estimate(_run(tiny_dir, model={"name_or_path": str(tiny_dir), "dtype": "bfloat16"}))
    assert half.weights_bytes * 2 == full.weights_bytes
    assert half.gradient_bytes * 2 == full.gradient_bytes
    tensors = _tensors()
    assert half.state_bytes - 4 * tensors == (full.state_bytes - 4 * tensors) // 2  # float32 `step` scalars stay


def test_freeze_counts_gradients_and_state_of_the_trainable_parameters_only(tiny_dir):
    model = tiny_llama()
    mlp = sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)
    mlp_tensors = sum(1 for n, _ in model.named_parameters() if ".mlp." in n)
    [row] = estimate(_run(tiny_dir, finetuning={"type": "freeze", "trainable": [r"\.mlp\."]}))
    assert row.trainable_params == mlp
    assert row.weights_bytes == 4 * row.total_params
    assert row.gradient_bytes == 4 * mlp
    assert row.state_bytes == 2 * 4 * mlp + 4 * mlp_tensors


def test_freeze_pattern_that_matches_nothing_is_an_error(tiny_dir):
    with pytest.raises(optiplug.ConfigError) as info:
        estimate(_run(tiny_dir, finetuning={"type": "freeze", "trainable": ["mlpp"]}))
    assert str(info.value) == (
        "finetuning.trainable: 'mlpp' matches no parameter name; names look like: model.embed_tokens.weight, "
        "model.layers.0.self_attn.q_proj.weight, lm_head.weight"
    )


def test_lora_counts_the_adapter_as_trainable_on_meta_as_on_the_real_model(tiny_dir):
    from optiplug.app.estimate import model_shapes

    real = _model({**LORA, "init": "pissa"})
    shapes = model_shapes(_run(tiny_dir, finetuning={**LORA, "init": "pissa"}))  # PiSSA's SVD is skipped on meta
    assert list(shapes.trainable) == optiplug.ParamShape.of_model(real)
    config = tiny_llama().config
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    r = LORA["r"]
    adapter = layers * (4 * r * (h + h) + 3 * r * (h + i))  # A and B on q, k, v, o (h x h) and gate, up, down
    assert shapes.trainable_params == adapter
    assert shapes.total_params == sum(p.numel() for p in tiny_llama().parameters()) + adapter


def test_the_runs_own_optimizer_keeps_its_fields_and_others_use_defaults(tiny_dir):
    run = _run(tiny_dir, optimizer={"name": "adamw", "amsgrad": True})
    rows = _by_name(estimate(run, ["adamw", "adam", "sgd"]))
    assert list(rows) == ["adamw", "adam", "sgd"]
    assert rows["adamw"].state_bytes - 4 * _tensors() == 3 * rows["adamw"].weights_bytes  # amsgrad: three moments
    assert rows["adam"].state_bytes - 4 * _tensors() == 2 * rows["adam"].weights_bytes


def test_an_entry_without_state_bytes_shows_na(tiny_dir, temp_plugin):

    class PlainConfig(optiplug.OptimizerConfig):
        name: Literal["plain_sgd_test"] = "plain_sgd_test"

    class Plugin:
        @optiplug.hookimpl
        def register_optimizers(self, register):
            register(optiplug.OptimizerEntry(config=PlainConfig, build=lambda ctx, cfg: None, summary="no state_bytes"))

    temp_plugin(Plugin(), "plain-sgd-test")
    rows = _by_name(estimate(_run(tiny_dir), ["plain_sgd_test", "adamw"]))
    assert rows["plain_sgd_test"].state_bytes is None and rows["plain_sgd_test"].total_bytes is None
    assert rows["adamw"].state_bytes is not None
    assert format_bytes(None) == "n/a"


def test_unknown_optimizer_is_named_with_suggestions(tiny_dir):
    with pytest.raises(optiplug.UnknownNameError) as info:
        estimate(_run(tiny_dir), ["adamw", "sgdd"])
    assert str(info.value).splitlines()[0].startswith("unknown optimizer 'sgdd'. Did you mean 'sgd'")


def test_embedded_model_is_the_default():
    [row] = estimate()
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(Path(optiplug.__file__).parent / "assets" / "model")
    assert config.tie_word_embeddings  # the shared embedding is counted once
    h, i, v, n = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    assert row.total_params == v * h + n * (4 * h * h + 3 * h * i + 2 * h) + h
    assert row.optimizer == "adamw"


# ---- finding the model offline --------------------------------------------------------------


def test_hub_id_not_in_the_cache_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(optiplug.ConfigError) as info:
        estimate(optiplug.app.RunConfig(model={"name_or_path": "acme/llama-9b"}))
    assert str(info.value) == (
        f"model.name_or_path: 'acme/llama-9b' is neither a local directory nor a hub id whose config.json is in "
        f"the local cache ({tmp_path}); estimate never downloads: run `hf download acme/llama-9b config.json` "
        f"first or give a local model directory"
    )


def test_hub_id_whose_config_is_in_the_cache_is_found_offline(tmp_path, monkeypatch, tiny_dir):
    # the layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/config.json}
    repo = tmp_path / "models--acme--tiny-llama"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text((tiny_dir / "config.json").read_text())
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    [cached] = estimate(optiplug.app.RunConfig(model={"name_or_path": "acme/tiny-llama"}))
    [local] = estimate(_run(tiny_dir))
    assert cached == local


def test_directory_without_config_json_is_an_error(tmp_path):
    with pytest.raises(optiplug.ConfigError) as info:
        estimate(_run(tmp_path))
    assert str(info.value) == f"model.name_or_path: the directory {str(tmp_path)!r} has no config.json"


# ---- Llama-2-7B shapes on the meta device ---------------------------------------------------


@pytest.fixture(scope="module")
def llama7b(llama7b_dir):
    from optiplug.app.estimate import model_shapes

    return model_shapes(_run(llama7b_dir))


def test_llama7b_adamw_holds_two_float32_moments_per_parameter(llama7b):
    from optiplug.app.estimate import estimate_shapes

    [row] = estimate_shapes(llama7b, [optiplug.app.RunConfig().optimizer])
    assert row.total_params == 6_738_415_616
    assert row.state_bytes == 2 * 4 * 6_738_415_616 + 4 * len(llama7b.trainable)


def _installed(name: str, plugin: str) -> None:
    from optiplug.registry import optimizer_names

    if name not in optimizer_names():
        pytest.skip(f"optimizer {name!r} is not registered: install the plugin (pip install -e plugins/{plugin})")


def test_llama7b_galore_rank_1024_cuts_optimizer_state_by_about_65_percent(llama7b):
    from optiplug.app.estimate import estimate_shapes

    _installed("galore_adamw", "galore")
    adamw, galore = estimate_shapes(
        llama7b,
        [
            optiplug.app.RunConfig().optimizer,
            optiplug.app.RunConfig(optimizer={"name": "galore_adamw", "rank": 1024}).optimizer,
        ],
    )
    cut = 1 - galore.state_bytes / adamw.state_bytes
    assert 0.62 <= cut <= 0.68, f"GaLore rank 1024 cuts the optimizer state by {cut:.1%}"


def test_llama7b_badam_with_32_blocks_holds_the_state_of_one_block(llama7b):
    from optiplug.app.estimate import estimate_shapes

    _installed("badam", "badam")
    [badam] = estimate_shapes(llama7b, [optiplug.app.RunConfig(optimizer={"name": "badam"}).optimizer])
    adam = optiplug.get_entry("adamw").state_bytes
    layer0 = [s for s in llama7b.trainable if s.name.startswith("model.layers.0.")]
    one_block = adam(layer0, optiplug.app.RunConfig().optimizer)
    assert badam.state_bytes == one_block
    assert badam.state_bytes * 32 < adam(llama7b.trainable, optiplug.app.RunConfig().optimizer)


# ---- the command ----------------------------------------------------------------------------


def _invoke(*argv: str):
    import typer
    from typer.testing import CliRunner

    from optiplug.app import estimate as module

    app = typer.Typer()
    app.command("estimate")(module.command)
    app.command("other")(lambda: None)  # two commands, so typer keeps the subcommand name
    return CliRunner().invoke(app, ["estimate", *argv])


def test_command_prints_a_table(llama7b_dir):
    result = _invoke(f"model.name_or_path={llama7b_dir}", "model.dtype=bfloat16", "--optimizers", "adamw,sgd")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"{llama7b_dir} (bfloat16, full fine-tuning): 6.74B parameters, 6.74B trainable"
    adamw = next(line for line in lines if "adamw" in line)
    assert [cell.strip() for cell in re.split(r"[│|]", adamw) if cell.strip()] == [
        "adamw",
        "12.55 GiB",
        "12.55 GiB",
        "25.10 GiB",
        "50.21 GiB",
    ]


def test_command_json(tiny_dir):
    result = _invoke(f"model.name_or_path={tiny_dir}", "--optimizers", "sgd", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    [row] = data["estimates"]
    assert (data["model"], data["dtype"], data["finetuning"]) == (str(tiny_dir), "float32", "full")
    assert row["optimizer"] == "sgd" and row["state_bytes"] == row["weights_bytes"]


def test_command_rejects_an_empty_optimizer_list(tiny_dir):
    result = _invoke(f"model.name_or_path={tiny_dir}", "--optimizers", ",")
    assert (
        str(result.exception) == "--optimizers: expected comma-separated optimizer names, e.g. --optimizers adamw,sgd"
    )


def test_importing_the_commands_does_not_import_torch():
    code = (
        "import sys, optiplug.app.estimate, optiplug.app.compare; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---- entries without state_bytes: measured on the meta model ---------------------------------


def _no_formula() -> list[str]:
    return [row.name for row in optiplug.list_optimizers() if row.entry.state_bytes is None]


@pytest.mark.parametrize("name", _no_formula())
def test_state_measured_on_meta_equals_a_real_step_or_is_unknown(name):
    import torch

    from optiplug.app.estimate import measured_on_meta
    from optiplug.testing import tiny_llama

    cfg = optiplug.parse_optimizer(name)
    with torch.device("meta"):
        meta = tiny_llama()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        measured = measured_on_meta(meta, cfg)
    model = tiny_llama()
    try:
        optimizer = optiplug.build_optimizer(model, cfg)
    except optiplug.OptiplugError as error:  # an entry refusing this model refuses it on meta too
        assert measured is None, f"{name}: measured on meta, but refused for real: {error}"
        return
    model(input_ids=torch.arange(16)[None], labels=torch.arange(16)[None]).loss.backward()
    optimizer.step()
    if measured is None:  # unknown only where the plugin says why (n/a in `optiplug estimate`), never by accident
        assert name in _unknown_by_design(), f"{name}: not measured on meta, and no reason is declared"
        assert [str(w.message).split(" (")[0] for w in said] == [f"optiplug: {name}: cannot be measured on meta"]
        return
    assert measured == optiplug.optimizer_state_bytes(optimizer), name


def _unknown_by_design() -> set[str]:
    """The bridged optimizers whose state size the values decide (optiplug_pytorch_optimizer.NO_ESTIMATE)."""
    try:
        from optiplug_pytorch_optimizer import NO_ESTIMATE, PREFIX
    except ImportError:
        return set()
    return {PREFIX + name for name in NO_ESTIMATE}


class _NoFormulaConfig(optiplug.OptimizerConfig):
    name: Literal["no_formula_sgd"] = "no_formula_sgd"


class _NoFormulaPlugin:
    @optiplug.hookimpl
    def register_optimizers(self, register):
        def build(ctx, cfg):
            import torch

            return torch.optim.SGD(ctx.param_groups(0.0), lr=0.1, momentum=0.9)

        register(optiplug.OptimizerEntry(config=_NoFormulaConfig, build=build))


def test_estimate_measures_an_entry_without_a_formula_and_says_so(temp_plugin):
    from optiplug.app.estimate import estimate

    temp_plugin(_NoFormulaPlugin(), "no-formula")
    rows = {row.optimizer: row for row in estimate(None, ["no_formula_sgd", "sgd"])}
    assert rows["sgd"].state_source == "entry" and rows["no_formula_sgd"].state_source == "measured"
    assert rows["no_formula_sgd"].state_bytes == rows["sgd"].state_bytes  # one momentum buffer per parameter


class _DescribedPlugin:
    @optiplug.hookimpl
    def register_optimizers(self, register):
        def build(ctx, cfg):
            import torch

            return torch.optim.SGD(ctx.param_groups(0.0), lr=0.1)

        def describe(shapes, cfg):
            return f"{sum(len(s.shape) == 2 for s in shapes)} matrices, {sum(len(s.shape) != 2 for s in shapes)} others"

        register(
            optiplug.OptimizerEntry(
                config=_NoFormulaConfig, build=build, state_bytes=lambda shapes, cfg: 0, describe=describe
            )
        )


def test_estimate_shows_what_an_entry_describes(temp_plugin, capsys):
    from optiplug.app.cli import main

    temp_plugin(_DescribedPlugin(), "described")
    [row] = estimate(None, ["no_formula_sgd"])
    assert (
        row.detail == "15 matrices, 5 others"
    )  # the embedded Llama: 7 matrices in each of 2 layers, the tied embedding
    with pytest.raises(SystemExit):
        main(["estimate", "--optimizers", "no_formula_sgd"])
    assert "no_formula_sgd: 15 matrices, 5 others" in capsys.readouterr().out


def test_layerwise_holds_one_gradient_at_a_time_without_accumulation():
    plain, layerwise = estimate(None, ["adamw", {"name": "adamw", "layerwise": True}])
    largest = max(s.numel * s.itemsize for s in _default_shapes().trainable)
    assert layerwise.gradient_bytes == largest < plain.gradient_bytes
    assert layerwise.state_bytes == plain.state_bytes
    [accumulating] = estimate(
        None, [{"name": "adamw", "layerwise": True}], overrides=["training.gradient_accumulation_steps=2"]
    )
    assert accumulating.gradient_bytes == plain.gradient_bytes  # every gradient lives until the boundary


def _default_shapes():
    from optiplug.app.config import load_config
    from optiplug.app.estimate import model_shapes

    return model_shapes(load_config())


# ---- one process's share of N (--nproc N --engine ENGINE) -----------------------------------


@pytest.mark.parametrize(
    ("engine", "cut"),
    [("ddp", (1, 1, 1)), ("zero1", (1, 1, 4)), ("zero2", (1, 4, 4)), ("zero3", (4, 4, 4)), ("fsdp", (4, 4, 4))],
)
def test_each_engine_cuts_weights_gradients_and_state_into_one_process_s_share(tiny_dir, engine, cut):
    [whole] = estimate(_run(tiny_dir), ["adamw"])
    [share] = estimate(_run(tiny_dir), ["adamw"], processes=4, engine=engine)
    assert (share.processes, share.engine, share.engine_check) == (4, engine, "passed")
    for field, parts in zip(("weights_bytes", "gradient_bytes", "state_bytes"), cut):
        assert getattr(share, field) == -(-getattr(whole, field) // parts), field
    assert share.total_bytes == share.weights_bytes + share.gradient_bytes + share.state_bytes
    assert whole.engine_check is None  # one process: no engine to check


def test_an_optimizer_the_engine_refuses_is_marked_with_the_sentence(tiny_dir):
    rows = _by_name(estimate(_run(tiny_dir), ["adamw", "galore_adamw", "po_lamb"], processes=2, engine="zero2"))
    assert rows["adamw"].engine_check == "passed"
    assert rows["galore_adamw"].engine_check.startswith(
        "refused: galore_adamw projects whole weight matrices, and DeepSpeed (ZeRO stage 2) hands the optimizer"
    )
    assert rows["po_lamb"].engine_check.startswith("refused: po_lamb reads across each weight tensor (the trust ratio")
    fsdp = _by_name(estimate(_run(tiny_dir), ["galore_adamw", "adam_mini"], processes=2, engine="fsdp"))
    assert fsdp["galore_adamw"].engine_check == fsdp["adam_mini"].engine_check == "passed"
    cut = _by_name(estimate(_run(tiny_dir), ["adam_mini"], processes=8, engine="fsdp"))["adam_mini"]
    assert cut.engine_check.startswith("refused: adam_mini under FSDP with 8 processes: ")


def test_command_per_process_table_and_json(tiny_dir):
    result = _invoke(f"model.name_or_path={tiny_dir}", "--optimizers", "adamw,po_lamb", "--nproc", "2",
                     "--engine", "zero2")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].endswith("; per process of 2 under DeepSpeed ZeRO-2")
    lamb = next(line for line in result.output.splitlines() if line.startswith("│ po_lamb"))
    assert lamb.rstrip("│ ").endswith("refused")
    assert "po_lamb: refused: po_lamb reads across each weight tensor" in result.output
    data = json.loads(_invoke(f"model.name_or_path={tiny_dir}", "--optimizers", "adamw", "--nproc", "2", "--engine",
                              "fsdp", "--json").output)  # fmt: skip
    assert (data["processes"], data["engine"], data["estimates"][0]["engine_check"]) == (2, "fsdp", "passed")


@pytest.mark.parametrize(("argv", "message"), [
    (["--nproc", "0"], "--nproc must be at least 1, got 0"),
    (["--engine", "zero0"], "--engine must be one of ddp, zero1, zero2, zero3, fsdp, got 'zero0'"),
])  # fmt: skip
def test_command_refuses_a_bad_launch(tiny_dir, argv, message):
    assert str(_invoke(f"model.name_or_path={tiny_dir}", "--optimizers", "adamw", *argv).exception) == message
