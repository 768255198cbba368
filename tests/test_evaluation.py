"""Evaluation data in a run: data.eval_path / data.eval_ratio, eval loss and perplexity, plateau schedules, compare."""

from __future__ import annotations

import json
import math

import pytest
import torch

import optiplug
import optiplug.app
from optiplug import ConfigError
from optiplug.app import DataConfig
from optiplug.app.compare import CompareRun, ProcessResult, plot, print_table, read_run
from optiplug.app.config import load_config
from optiplug.app.data import _token_ids, assets_dir, load_datasets, read_documents
from optiplug.app.run import validate_run


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets_dir() / "tokenizer")


def _write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


# ---- the split --------------------------------------------------------------------------------


@pytest.mark.parametrize("max_blocks", [None, 40])
def test_eval_ratio_holds_out_the_end_of_the_token_stream_before_blocks_are_cut(tokenizer, tmp_path, max_blocks):
    corpus = _write_jsonl(
        tmp_path / "c.jsonl", [f"document {i}: " + "some words here " * (i % 7 + 1) for i in range(80)]
    )
    data = DataConfig(path=str(corpus), block_size=16, max_blocks=max_blocks, eval_ratio=0.2)
    train, evaluation = load_datasets(data, tokenizer)
    again = load_datasets(data, tokenizer)
    assert torch.equal(train.blocks, again[0].blocks) and torch.equal(evaluation.blocks, again[1].blocks)

    ids = _token_ids(read_documents(data), tokenizer, None)
    if max_blocks is not None:
        ids = ids[: max_blocks * 16]
    held = round(len(ids) * 0.2)
    split = len(ids) - held
    # training blocks: the stream's start, up to the split; evaluation blocks: from the split on. No token in both.
    assert train.blocks.flatten().tolist() == ids[: len(train) * 16] and len(train) == split // 16
    assert evaluation.blocks.flatten().tolist() == ids[split : split + len(evaluation) * 16]
    assert len(evaluation) == held // 16 >= 1
    if max_blocks is not None:
        assert len(train) + len(evaluation) <= max_blocks
    # the training blocks are the first blocks of the run without evaluation
    plain, none = load_datasets(DataConfig(path=str(corpus), block_size=16, max_blocks=max_blocks), tokenizer)
    assert none is None and torch.equal(plain.blocks[: len(train)], train.blocks)


def test_a_split_that_leaves_no_evaluation_block_is_refused_before_reading(tokenizer, tmp_path):
    data = DataConfig(block_size=16, max_blocks=10, eval_ratio=0.05)
    message = (
        "data.eval_ratio=0.05 holds out 8 of the 160 tokens data.max_blocks=10 reads at most, fewer than one "
        "evaluation block of data.block_size=16: raise data.eval_ratio or data.max_blocks, or give held-out text "
        "in data.eval_path"
    )
    with pytest.raises(ConfigError) as info:
        load_datasets(data, tokenizer)
    assert str(info.value) == message
    cfg = load_config(None, ["data.block_size=16", "data.max_blocks=10", "data.eval_ratio=0.05"])
    with pytest.raises(ConfigError) as info:  # optiplug validate: nothing tokenized
        validate_run(cfg)
    assert str(info.value) == message
    small = _write_jsonl(tmp_path / "small.jsonl", ["a few words only, not enough for two blocks of text"])
    with pytest.raises(ConfigError, match=r"^data.eval_ratio=0.1 holds out \d of the \d+ tokens read, fewer than one"):
        load_datasets(DataConfig(path=str(small), block_size=8, eval_ratio=0.1), tokenizer)


def test_eval_path_reads_like_data_path_and_errors_name_it(tokenizer, tmp_path):
    train = _write_jsonl(tmp_path / "train.jsonl", ["training text " * 40])
    held = _write_jsonl(tmp_path / "held.jsonl", ["held out text " * 30, "more of it " * 20])
    data = DataConfig(path=str(train), eval_path=str(held), block_size=8, eval_max_blocks=3)
    blocks, evaluation = load_datasets(data, tokenizer)
    expected = _token_ids(read_documents(data, evaluation=True), tokenizer, None)[:24]
    assert evaluation.blocks.flatten().tolist() == expected and len(evaluation) == 3
    assert len(blocks) == len(_token_ids(read_documents(data), tokenizer, None)) // 8

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    for eval_path, message in [
        (str(tmp_path / "missing.txt"), f"data.eval_path: '{tmp_path / 'missing.txt'}' does not exist"),
        (str(bad), f"data.eval_path: '{bad}' line 2 is not valid JSON: Expecting value"),
        (str(train), f"data.eval_path: '{train}' is also training data (data.path): evaluating on trained text"),
    ]:
        with pytest.raises(ConfigError) as info:
            load_datasets(DataConfig(path=str(train), eval_path=eval_path, block_size=8), tokenizer)
        assert str(info.value).startswith(message)
    # optiplug validate checks the evaluation files as it checks the training files (no reading)
    with pytest.raises(ConfigError, match=r"^data.eval_path: .* does not exist$"):
        validate_run(load_config(None, [f"data.eval_path={tmp_path / 'missing.txt'}"]))
    with pytest.raises(ConfigError, match="is also training data"):
        validate_run(load_config(None, [f"data.path={train}", f"data.eval_path={tmp_path}"]))


def test_evaluation_settings_that_cannot_work_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"^data: set eval_path or eval_ratio, not both$"):
        load_config(None, ["data.eval_ratio=0.1", "data.eval_path=x.txt"])
    with pytest.raises(ConfigError, match=r"^data: eval_max_blocks is only used with eval_path or eval_ratio$"):
        load_config(None, ["data.eval_max_blocks=4"])
    with pytest.raises(ConfigError, match=r"^data.eval_ratio: Input should be less than 1"):
        load_config(None, ["data.eval_ratio=1"])
    out = f"training.output_dir={tmp_path / 'out'}"
    for key, value in [("eval_strategy", "steps"), ("load_best_model_at_end", "true"), ("eval_on_start", "true")]:
        with pytest.raises(ConfigError) as info:
            validate_run(load_config(None, [out, f"training.{key}={value}"]))
        assert str(info.value).startswith(f"training.{key}=") and "needs evaluation data: hold out a share" in str(
            info.value
        )
    args = validate_run(load_config(None, [out, "data.eval_ratio=0.05", "training.eval_steps=20"]))
    assert (args.eval_strategy, args.eval_steps, args.prediction_loss_only) == ("steps", 20, True)
    args = validate_run(load_config(None, [out, "data.eval_ratio=0.05", "training.eval_strategy=no"]))
    assert args.eval_strategy == "no"


# ---- a run with evaluation --------------------------------------------------------------------


@pytest.fixture(scope="module")
def plateau_run(tmp_path_factory):
    """One run of the issue's example (eval_ratio 0.05, eval_strategy steps) with a plateau schedule.

    threshold 0.5 asks for a 50% better eval loss, which 7 steps cannot give: a plateau after the first
    evaluation, so with patience 1 the rate halves at the third evaluation. 7 steps, evaluated every 2:
    the last step is evaluated after training.
    """
    out = tmp_path_factory.mktemp("plateau") / "run"
    overrides = [
        "data.block_size=16", "data.max_blocks=64", "data.eval_ratio=0.05",
        "training.eval_strategy=steps", "training.eval_steps=2", "training.max_steps=7",
        "training.per_device_train_batch_size=4", "training.logging_steps=1", "training.disable_tqdm=true",
        "scheduler.name=reduce_lr_on_plateau", "scheduler.patience=1", "scheduler.factor=0.5",
        "scheduler.threshold=0.5", f"training.output_dir={out}",
    ]  # fmt: skip
    return optiplug.app.train(overrides=overrides)


def test_eval_loss_and_perplexity_are_logged_and_summarised(plateau_run):
    out = plateau_run.output_dir
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    evaluations = [entry for entry in history if "eval_loss" in entry]
    assert [entry["step"] for entry in evaluations] == [2, 4, 6, 7]  # every eval_steps, and the last step
    for entry in evaluations:
        assert entry["eval_perplexity"] == pytest.approx(math.exp(entry["eval_loss"]))
        assert 6.0 < entry["eval_loss"] < 8.5
    summary = plateau_run.summary
    assert summary == json.loads((out / "summary.json").read_text())
    best = min(evaluations, key=lambda entry: entry["eval_loss"])
    assert summary["final_eval_loss"] == evaluations[-1]["eval_loss"] and summary["final_eval_step"] == 7
    assert (summary["best_eval_loss"], summary["best_eval_step"]) == (best["eval_loss"], best["step"])
    assert summary["final_eval_perplexity"] == pytest.approx(math.exp(summary["final_eval_loss"]))
    assert summary["evaluations"] == 4
    assert summary["data"]["eval_ratio"] == 0.05 and summary["data"]["eval_blocks"] == 3  # round(1024 * 0.05) // 16
    assert summary["data"]["blocks"] == (1024 - 51) // 16


def test_reduce_lr_on_plateau_lowers_the_rate_when_the_eval_loss_stops_improving(plateau_run):
    history = json.loads((plateau_run.output_dir / "trainer_state.json").read_text())["log_history"]
    rates = {entry["step"]: entry["learning_rate"] for entry in history if "loss" in entry}
    lr = 1e-3
    assert rates == {1: lr, 2: lr, 3: lr, 4: lr, 5: lr, 6: lr, 7: lr / 2}
    # torch's own ReduceLROnPlateau fed the logged eval losses (during training) takes the same decisions
    parameter = torch.nn.Parameter(torch.zeros(1))
    reference = torch.optim.SGD([parameter], lr=lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(reference, factor=0.5, patience=1, threshold=0.5)
    for entry in history:
        if "eval_loss" in entry and entry["step"] < 7:
            scheduler.step(entry["eval_loss"])
    assert reference.param_groups[0]["lr"] == rates[7]


def test_loss_png_and_compare_show_the_evaluations(plateau_run, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    out = plateau_run.output_dir
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = read_run("adamw", out, ProcessResult(0, 1.0, 2**20, out / "compare.log"))
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert run.eval_losses == [[e["step"], e["eval_loss"]] for e in history if "eval_loss" in e]
    assert (run.final_eval_loss, run.best_eval_loss) == (
        plateau_run.summary["final_eval_loss"],
        plateau_run.summary["best_eval_loss"],
    )
    shown = {}
    monkeypatch.setattr(plt, "close", lambda fig: shown.setdefault("fig", fig))
    plot([run, CompareRun("sgd", False, error="failed")], tmp_path / "compare.png")
    axes = shown["fig"].axes
    assert [a.get_title() for a in axes][:3] == ["loss", "evaluation loss", "learning rate"]
    assert [list(line.get_ydata()) for line in axes[1].get_lines()] == [[loss for _, loss in run.eval_losses]]


def test_compare_table_has_eval_columns_only_with_evaluation(capsys):
    with_eval = CompareRun("adamw", True, final_loss=5.0, final_eval_loss=5.25, best_eval_loss=5.125,
                           eval_losses=[[2, 5.125], [4, 5.25]])  # fmt: skip
    print_table([with_eval])
    header, row = (line for line in capsys.readouterr().out.splitlines() if "adamw" in line or "optimizer" in line)
    assert "eval loss" in header and "best eval" in header and "5.2500" in row and "5.1250" in row
    print_table([CompareRun("adamw", True, final_loss=5.0)])
    assert "eval" not in capsys.readouterr().out


@pytest.mark.parametrize("scheduler", ["reduce_lr_on_plateau", "greedy"])
def test_schedules_that_follow_a_metric_follow_the_eval_loss(scheduler, tmp_path):
    """transformers defaults metric_for_best_model only for its own plateau schedules; without it the first
    evaluation of an OptiTrainer with such a schedule failed ('NoneType' object has no attribute 'startswith')."""
    from optiplug.testing import TokenBlocks, tiny_llama, training_args

    evaluating = {"eval_strategy": "steps", "eval_steps": 2}  # a run that never evaluates is refused
    trainer = optiplug.OptiTrainer(
        model=tiny_llama(), args=training_args(tmp_path, **evaluating), train_dataset=TokenBlocks(n=8),
        eval_dataset=TokenBlocks(n=4), scheduler=scheduler,
    )  # fmt: skip
    assert trainer.args.metric_for_best_model is None
    trainer.create_optimizer_and_scheduler(num_training_steps=6)
    assert (trainer.args.metric_for_best_model, trainer.args.greater_is_better) == ("loss", False)
    other = optiplug.OptiTrainer(
        model=tiny_llama(), args=training_args(tmp_path, metric_for_best_model="eval_accuracy", **evaluating),
        train_dataset=TokenBlocks(n=8), eval_dataset=TokenBlocks(n=4), scheduler=scheduler,
    )  # fmt: skip
    other.create_optimizer_and_scheduler(num_training_steps=6)
    assert other.args.metric_for_best_model == "eval_accuracy"  # the user's metric is kept
