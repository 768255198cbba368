"""Issue 14: nothing lost, nothing silently wrong. One test (or more) per case of the issue, with exact messages."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import optiplug
import optiplug.app
from optiplug import CheckpointError, ConfigError, PluginError
from optiplug.app.checkpoints import PARTIAL
from optiplug.app.data import assets_dir
from optiplug.app.run import SUMMARY_FILE
from optiplug.app.safety import CHECKPOINT_RECORD, MARKER
from optiplug.app.testing import read_only, run_cli, run_cli_unprivileged

FAST = [
    "data.block_size=16",
    "data.max_blocks=32",
    "training.max_steps=4",
    "training.per_device_train_batch_size=4",
    "training.logging_steps=1",
    "training.disable_tqdm=true",
]


def last_line(err: str) -> str:
    """The ``optiplug: ...`` line of stderr (the Trainer's progress lines come before it)."""
    return [line for line in err.splitlines() if line.startswith("optiplug: ")][-1]


def tiny_model_dir(path: Path, tokenizer: bool = True) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    if tokenizer:
        AutoTokenizer.from_pretrained(assets_dir() / "tokenizer").save_pretrained(path)
    return path


class _Callback:
    """A plugin adding one TrainerCallback to every run (``on_step_end(trainer, state)`` does the work)."""

    def __init__(self, on_step_end):
        self.on_step_end = on_step_end

    @optiplug.hookimpl
    def trainer_callbacks(self, trainer, config):
        from transformers import TrainerCallback

        work = self.on_step_end

        class Do(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                work(trainer, state)

        return [Do()]


# ---- 1. diverging runs ----------------------------------------------------------------------------


def test_a_diverging_run_stops_with_one_line_and_saves_no_model(tmp_path):
    # Issue 19's case: lr 1e6 blows the weights up after step 1. Some CPUs' kernels turn that into NaN, others
    # into a finite dead network (gradients exactly 0, the loss constant at ln(vocabulary)): both must stop.
    out = tmp_path / "run"
    code, _, err = run_cli("train", *FAST, "training.max_steps=8", "optimizer.lr=1e6", f"training.output_dir={out}")
    assert code == 1
    assert "Traceback" not in err and "optiplug: done" not in err
    summary = json.loads((out / SUMMARY_FILE).read_text())
    advice = "no model was saved as the result; no checkpoint was saved before it; lower optimizer.lr"
    if summary["diverged"] == "the gradient norm is nan":
        assert (
            last_line(err)
            == f"optiplug: training diverged at step 2: the gradient norm is nan; {advice} and train again"
        )
        assert summary["steps"] == 1
    else:
        assert summary["diverged"] == (
            "the gradients have been exactly 0 for 3 steps in a row (steps 2 to 4): the weights no longer change, the "
            "network is dead"
        )
        assert last_line(err) == (
            f"optiplug: training diverged at step 2: {summary['diverged']}; {advice} (guard.zero_grad_steps: null turns "
            "this rule off) and train again"
        )
        assert summary["steps"] == 3
    assert summary["status"] == "diverged" and summary["diverged_at_step"] == 2 and summary["last_checkpoint"] is None
    assert not (out / "model.safetensors").exists()
    assert json.loads((out / MARKER).read_text())["status"] == "diverged"


class _Poison:
    """A plugin whose callback runs ``poison(model)`` after optimizer step ``at`` and records the logged losses."""

    def __init__(self, at: int, poison):
        self.at, self.poison, self.losses = at, poison, {}

    @optiplug.hookimpl
    def trainer_callbacks(self, trainer, config):
        from transformers import TrainerCallback

        plugin = self

        class Poison(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == plugin.at:
                    with torch.no_grad():
                        plugin.poison(trainer.model)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    plugin.losses[state.global_step] = logs["loss"]

        return [Poison()]


def _zero_every_weight(model):
    for p in model.parameters():
        p.zero_()


def test_a_dead_network_stops_though_everything_stays_finite(tmp_path, temp_plugin):
    # every weight 0 after step 1: a finite blow-up into a dead network, every gradient after it exactly 0; plain
    # SGD (no momentum, no weight decay) cannot leave it, and the loss stays ln(2048), finite
    plugin = temp_plugin(_Poison(1, _zero_every_weight), "poison")
    out = tmp_path / "run"
    sgd = ["optimizer.name=sgd", "optimizer.momentum=0", "optimizer.lr=0.1", "training.max_steps=8"]
    with pytest.raises(optiplug.OptiplugError) as info:
        optiplug.app.train(overrides=[*FAST, *sgd, "training.save_steps=1", f"training.output_dir={out}"], quiet=True)
    assert str(info.value) == (
        "training diverged at step 2: the gradients have been exactly 0 for 3 steps in a row (steps 2 to 4): the "
        "weights no longer change, the network is dead; no model was saved as the result; the last checkpoint before "
        f"it is {out / 'checkpoint-1'}: lower optimizer.lr (guard.zero_grad_steps: null turns this rule off) and start "
        f"a new run from its weights (model.name_or_path={out / 'checkpoint-1'})"
    )
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["status"] == "diverged" and summary["diverged_at_step"] == 2 and summary["steps"] == 3
    assert summary["guard"]["zero_grad_steps"] == 3  # the rules the run was judged by
    assert sorted(plugin.losses) == [1, 2, 3]
    assert plugin.losses[2] == plugin.losses[3] == pytest.approx(math.log(2048))  # finite, and constant
    assert not (out / "model.safetensors").exists() and not (out / "checkpoint-4").exists()
    # the rule turned off: the same run finishes (and saves its dead model, as asked)
    finished = optiplug.app.train(overrides=[*FAST, *sgd, f"training.output_dir={tmp_path / 'off'}",
                                         "guard.zero_grad_steps=null"], quiet=True)  # fmt: skip
    assert finished.summary["status"] == "finished" and finished.summary["steps"] == 8
    assert finished.summary["guard"]["zero_grad_steps"] is None


def _blow_up_the_head(model):
    model.get_output_embeddings().weight.mul_(40.0)  # tied to the input embeddings: both x 40


def test_a_loss_spike_that_stays_finite_stops_after_patience_logged_steps(tmp_path, temp_plugin):
    plugin = temp_plugin(_Poison(3, _blow_up_the_head), "spike")
    out = tmp_path / "run"
    with pytest.raises(optiplug.OptiplugError) as info:
        optiplug.app.train(overrides=[*FAST, "training.max_steps=10", "training.save_steps=2", f"training.output_dir={out}"],
                       quiet=True)  # fmt: skip
    losses = plugin.losses
    lowest_step = min((1, 2, 3), key=losses.get)
    lowest = losses[lowest_step]
    # steps 4, 5 and 6 logged above 3 x the lowest: it stops at step 6 and names step 4
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(losses[step]) and losses[step] > 3 * lowest for step in (4, 5, 6))
    spikes = ", ".join(f"{losses[step]:.4g} at step {step}" for step in (4, 5, 6))
    checkpoint = out / "checkpoint-2"  # checkpoint-4 was saved after the spike began
    assert str(info.value) == (
        f"training diverged at step 4: the training loss stayed above 3 x its lowest logged value ({lowest:.4g} at "
        f"step {lowest_step}) for 3 logged steps: {spikes}; no model was saved as the result; the last checkpoint "
        f"before it is {checkpoint}: lower optimizer.lr or clip the gradients harder (training.max_grad_norm); if the "
        f"rise is expected, raise guard.loss_spike_factor and start a new run from its weights "
        f"(model.name_or_path={checkpoint})"
    )
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["status"] == "diverged" and summary["diverged_at_step"] == 4 and summary["steps"] == 6
    assert summary["last_checkpoint"] == str(checkpoint)
    assert not (out / "model.safetensors").exists() and not (out / "checkpoint-6").exists()


def test_a_real_finite_blow_up_is_caught_as_a_loss_spike(tmp_path, temp_plugin):
    # SGD at lr 50: the loss jumps from 7.6 to tens (finite here); no poison, the optimizer does it
    plugin = temp_plugin(_Poison(-1, None), "record")
    out = tmp_path / "run"
    with pytest.raises(optiplug.OptiplugError) as info:
        optiplug.train(overrides=[*FAST, "training.max_steps=12", "optimizer.name=sgd", "optimizer.lr=50",
                                  f"training.output_dir={out}"], quiet=True)  # fmt: skip
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["status"] == "diverged" and not (out / "model.safetensors").exists()
    losses = plugin.losses
    if all(math.isfinite(value) for value in losses.values()) and summary["diverged"].startswith("the training"):
        steps = sorted(losses)
        high, before = steps[-3:], steps[:-3]
        assert before and all(losses[step] > 3 * min(losses[b] for b in before) for step in high)
        assert summary["diverged_at_step"] == high[0] and summary["steps"] == high[-1]
        assert str(info.value).startswith(f"training diverged at step {high[0]}: the training loss stayed above 3 x")
    else:  # a CPU whose kernels reach infinity or NaN on the way: the non-finite rule stops it first
        assert "nan" in summary["diverged"] or "inf" in summary["diverged"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "optimizer",
    [
        ["optimizer.name=adamw", "optimizer.layerwise=true"],  # gradients freed during backward
        ["optimizer.name=badam", "optimizer.switch_every=1"],  # gradients only for the active block
        ["optimizer.name=lomo"],  # the step fused into backward: no gradient left, the Trainer logs a norm of 0.0
        ["optimizer.name=adalomo"],
    ],
    ids=["layerwise", "badam", "lomo", "adalomo"],
)
def test_the_zero_gradient_rule_never_fires_where_gradients_are_absent(tmp_path, optimizer):
    out = tmp_path / "run"
    result = optiplug.app.train(
        overrides=[*FAST, "training.max_steps=5", *optimizer, "guard.zero_grad_steps=1", f"training.output_dir={out}"],
        quiet=True,
    )
    assert result.summary["status"] == "finished" and result.summary["steps"] == 5
    norms = [e["grad_norm"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert len(norms) == 5
    if "lomo" in optimizer[0]:
        assert norms == [0.0] * 5  # what the Trainer reports; the guard sees no gradient, so no evidence


def test_divergence_names_the_last_checkpoint_before_it(tmp_path, temp_plugin):
    def poison(trainer, state):
        if state.global_step == 3:
            with torch.no_grad():
                trainer.model.get_input_embeddings().weight.fill_(float("nan"))

    temp_plugin(_Callback(poison), "poison")
    out = tmp_path / "run"
    with pytest.raises(optiplug.OptiplugError) as info:
        optiplug.app.train(
            overrides=[*FAST, "training.max_steps=6", "training.save_steps=2", f"training.output_dir={out}"]
        )
    checkpoint = out / "checkpoint-2"
    assert str(info.value) == (
        "training diverged at step 4: the loss is nan and the gradient norm is nan; no model was saved as the "
        f"result; the last checkpoint before it is {checkpoint}: lower optimizer.lr and start a new run from its "
        f"weights (model.name_or_path={checkpoint})"
    )
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["status"] == "diverged" and summary["last_checkpoint"] == str(checkpoint)
    assert not (out / "model.safetensors").exists() and not (out / "checkpoint-4").exists()


# ---- 2. output directories ------------------------------------------------------------------------


def test_a_directory_with_the_users_files_is_refused_and_left_alone(tmp_path):
    (tmp_path / "config.json").write_text('{"mine": true}')
    code, _, err = run_cli("train", *FAST, f"training.output_dir={tmp_path}", "training.overwrite_output_dir=true")
    assert code == 1 and err == (
        f"optiplug: training.output_dir: '{tmp_path}' holds files optiplug did not write (config.json); "
        "choose a new or empty directory (optiplug never deletes files it did not write)\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    assert (tmp_path / "config.json").read_text() == '{"mine": true}'


def test_the_models_own_directory_is_always_refused(tmp_path):
    model = tiny_model_dir(tmp_path / "model")
    before = sorted(p.name for p in model.iterdir())
    for out in (model, model / "sub"):
        with pytest.raises(ConfigError) as info:
            optiplug.app.train(overrides=[*FAST, f"model.name_or_path={model}", f"training.output_dir={out}",
                                      "training.overwrite_output_dir=true"])  # fmt: skip
        assert str(info.value) == (
            f"training.output_dir: '{out}' is inside model.name_or_path '{model}'; a run never writes into its "
            "own input: choose another training.output_dir"
        )
    assert sorted(p.name for p in model.iterdir()) == before


def test_an_earlier_run_is_replaced_only_when_asked_and_its_files_go_first(tmp_path):
    out = tmp_path / "run"
    optiplug.app.train(overrides=[*FAST, "finetuning.type=lora", "training.save_steps=2", f"training.output_dir={out}"])
    assert (out / "adapter_config.json").exists() and (out / "checkpoint-4").is_dir()
    code, _, err = run_cli("train", *FAST, f"training.output_dir={out}")
    assert code == 1 and err == (
        f"optiplug: training.output_dir: '{out}' holds an earlier optiplug run; set "
        "training.overwrite_output_dir=true to replace it, or choose another directory\n"
    )
    optiplug.app.train(overrides=[*FAST, "training.max_steps=2", f"training.output_dir={out}",
                              "training.overwrite_output_dir=true"])  # fmt: skip
    names = {p.name for p in out.iterdir()}
    assert not any(name.startswith(("adapter_", "checkpoint-", "base_model")) for name in names), names
    assert json.loads((out / MARKER).read_text())["status"] == "finished"
    assert json.loads((out / SUMMARY_FILE).read_text())["steps"] == 2
    # a file the user added after that run is theirs: the next overwrite is refused and deletes nothing
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"holds files optiplug did not write \(notes.txt\)"):
        optiplug.app.train(overrides=[*FAST, f"training.output_dir={out}", "training.overwrite_output_dir=true"])
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").exists()


def test_overwrite_output_dir_must_be_a_boolean(tmp_path):
    code, _, err = run_cli("train", f"training.output_dir={tmp_path}", "training.overwrite_output_dir=yes")
    assert code == 1 and err == "optiplug: training.overwrite_output_dir: expected true or false (got 'yes')\n"


# ---- 3. resume mismatches -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory) -> Path:
    """A finished 4-step AdamW run with checkpoint-2 and checkpoint-4."""
    out = tmp_path_factory.mktemp("checkpointed") / "run"
    optiplug.app.train(overrides=[*FAST, "training.save_steps=2", f"training.output_dir={out}"])
    return out


def test_every_checkpoint_records_its_optimizer_and_scheduler(checkpointed):
    record = json.loads((checkpointed / "checkpoint-2" / CHECKPOINT_RECORD).read_text())
    assert record["optimizer"]["name"] == "adamw" and record["optimizer"]["lr"] == 1e-3
    assert record["scheduler"]["name"] == "cosine"


def test_resume_with_a_changed_optimizer_field_is_refused(checkpointed, tmp_path):
    ckpt = checkpointed / "checkpoint-2"
    code, _, err = run_cli("train", *FAST, f"training.output_dir={tmp_path / 'r'}",
                           f"training.resume_from_checkpoint={ckpt}", "optimizer.lr=0.1")  # fmt: skip
    assert code == 1 and err == (
        "optiplug: training.resume_from_checkpoint: optimizer.lr=0.1 (checkpoint: 0.001): a resumed run continues "
        f"the checkpoint's optimizer state; drop the change, or start a new run (from its weights: "
        f"model.name_or_path={ckpt})\n"
    )
    assert not (tmp_path / "r").exists()


def test_resume_with_another_optimizer_is_refused(checkpointed, tmp_path):
    ckpt = checkpointed / "checkpoint-2"
    code, _, err = run_cli("validate", str(_yaml(tmp_path)), f"training.resume_from_checkpoint={ckpt}",
                           "optimizer.name=sgd", f"training.output_dir={tmp_path / 'r'}")  # fmt: skip
    assert code == 1 and err == (
        f"optiplug: training.resume_from_checkpoint: '{ckpt}' was trained with optimizer 'adamw', this run "
        "selects 'sgd'; resume with optimizer.name=adamw, or start a new run\n"
    )


def test_resume_with_another_galore_rank_is_refused(tmp_path):
    pytest.importorskip("galore_torch")
    out = tmp_path / "run"
    opt = ["optimizer.name=galore_adamw", "optimizer.rank=8", "optimizer.update_proj_gap=2"]
    optiplug.app.train(
        overrides=[*FAST, *opt, "training.max_steps=2", "training.save_steps=2", f"training.output_dir={out}"]
    )
    with pytest.raises(CheckpointError, match=r"optimizer.rank=4 \(checkpoint: 8\): a resumed run continues"):
        optiplug.app.train(overrides=[*FAST, *opt, "optimizer.rank=4", f"training.output_dir={out}",
                                  f"training.resume_from_checkpoint={out / 'checkpoint-2'}"])  # fmt: skip


def test_a_checkpoint_without_optimizer_state_is_refused(checkpointed, tmp_path):
    ckpt = tmp_path / "checkpoint-2"
    shutil.copytree(checkpointed / "checkpoint-2", ckpt)
    (ckpt / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError) as info:
        optiplug.app.train(
            overrides=[*FAST, f"training.output_dir={tmp_path / 'r'}", f"training.resume_from_checkpoint={ckpt}"]
        )
    assert str(info.value) == (
        f"training.resume_from_checkpoint: '{ckpt}' has no optimizer.pt, so the optimizer's state would start "
        f"afresh; give a complete checkpoint, or start a new run from its weights (model.name_or_path={ckpt})"
    )


def test_a_resumed_run_reports_what_ran(checkpointed, tmp_path):
    ckpt = checkpointed / "checkpoint-2"
    result = optiplug.app.train(overrides=[*FAST, f"training.output_dir={tmp_path / 'r'}",
                                       f"training.resume_from_checkpoint={ckpt}"])  # fmt: skip
    record = json.loads((ckpt / CHECKPOINT_RECORD).read_text())
    assert result.summary["optimizer"] == record["optimizer"] and result.summary["scheduler"] == record["scheduler"]
    assert result.summary["resumed_from"] == str(ckpt) and result.summary["steps"] == 4


# ---- 4. save_steps alone --------------------------------------------------------------------------


def test_save_steps_alone_saves_checkpoints(checkpointed):
    assert sorted(p.name for p in checkpointed.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_save_total_limit_alone_means_save_strategy_steps():
    from optiplug.app.run import _training_arguments

    args = _training_arguments(optiplug.app.load_config(None, ["training.save_total_limit=2"]))
    assert str(args.save_strategy.value) == "steps"
    args = _training_arguments(optiplug.app.load_config(None, ["training.save_steps=5", "training.save_strategy=no"]))
    assert str(args.save_strategy.value) == "no"  # an explicit strategy is kept


# ---- 5. numbers are numbers -----------------------------------------------------------------------


def _yaml(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text("training: {max_steps: 2}\n")
    return path


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.lr=true", "optimizer.lr: expected a number, got the boolean true"),
        ("training.max_steps=yes",
         "training.max_steps: Input should be a valid integer, unable to parse string as an integer (got 'yes')"),
        ("training.max_steps=true", "training.max_steps: expected a number, got the boolean true"),
        ("training.max_steps=0",
         "training.max_steps: expected a positive number of steps, or -1 to train num_train_epochs (got 0)"),
        ("optimizer.lr=.inf", "optimizer.lr: Input should be a finite number (got inf)"),
        ("training.max_grad_norm=.nan", "training.max_grad_norm: Input should be a finite number (got nan)"),
        ("training.per_device_train_batch_size=0",
         "training.per_device_train_batch_size: expected a number greater than 0 (got 0)"),
    ],
)  # fmt: skip
def test_numbers_are_strict(tmp_path, override, message):
    code, _, err = run_cli("validate", str(_yaml(tmp_path)), override)
    assert code == 1 and err == f"optiplug: {message}\n"


def test_exponent_without_a_dot_is_a_float():
    from optiplug.app.run import _training_arguments

    args = _training_arguments(optiplug.app.load_config(None, ["training.max_grad_norm=5e-1"]))
    assert args.max_grad_norm == 0.5 and isinstance(args.max_grad_norm, float)


# ---- 6. the Python API ----------------------------------------------------------------------------


def test_optimizer_cls_and_kwargs_is_refused(tmp_path):
    from optiplug.testing import TokenBlocks, tiny_llama, training_args

    with pytest.raises(ConfigError) as info:
        optiplug.OptiTrainer(model=tiny_llama(), args=training_args(tmp_path), train_dataset=TokenBlocks(),
                             optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1}))  # fmt: skip
    assert str(info.value) == (
        "OptiTrainer builds the optimizer and scheduler from the registry: pass optimizer= and scheduler= "
        "(a name, mapping or config), not optimizer_cls_and_kwargs="
    )


def test_build_scheduler_needs_the_step_count_when_the_schedule_uses_it():
    optimizer = optiplug.build_optimizer(torch.nn.Linear(2, 2), "adamw")
    with pytest.raises(ConfigError) as info:
        optiplug.build_scheduler(optimizer, "cosine")
    assert str(info.value) == (
        "scheduler 'cosine' needs num_training_steps > 0: pass "
        "build_scheduler(optimizer, 'cosine', num_training_steps=TOTAL_STEPS)"
    )
    with pytest.raises(ConfigError, match=r"num_training_steps: expected a positive number of steps \(got -5\)"):
        optiplug.build_scheduler(optimizer, "cosine", num_training_steps=-5)
    optiplug.build_scheduler(optimizer, "constant")  # a constant rate needs no step count
    scheduler = optiplug.build_scheduler(optimizer, "cosine", num_training_steps=10)
    rates = []
    for _ in range(5):
        optimizer.step()
        scheduler.step()
        rates.append(scheduler.get_last_lr()[0])
    assert rates == sorted(rates, reverse=True) and rates[-1] > 0


def test_build_optimizer_without_a_model_and_train_with_a_dict():
    with pytest.raises(ConfigError) as info:
        optiplug.build_optimizer(None, "adamw")
    assert str(info.value) == (
        "build_optimizer needs the model (a torch.nn.Module) first, got NoneType: build_optimizer(model, 'adamw', lr=1e-3)"
    )
    with pytest.raises(ConfigError) as info:
        optiplug.app.train({"optimizer": {"name": "sgd"}})
    assert str(info.value) == (
        "expected a RunConfig, a YAML file path or None, got dict: build one with optiplug.app.RunConfig(**mapping)"
    )


# ---- 7. compare --timeout -------------------------------------------------------------------------


def test_compare_timeout_must_be_positive(tmp_path):
    code, _, err = run_cli("compare", "--optimizers", "adamw", "--timeout", "0", "--output", str(tmp_path))
    assert code == 1 and err == "optiplug: --timeout: expected a positive number of seconds, got 0\n"
    code, _, err = run_cli("compare", "--optimizers", "adamw", "--timeout", "-2", "--output", str(tmp_path))
    assert code == 1 and err == "optiplug: --timeout: expected a positive number of seconds, got -2\n"


def test_compare_passes_the_timeout_on(tmp_path, monkeypatch):
    from optiplug.app import compare

    seen = []

    def fake_run_process(cmd, log, env=None, timeout=None, poll=None):
        seen.append(timeout)
        raise KeyboardInterrupt  # stop before anything trains

    monkeypatch.setattr(compare, "run_process", fake_run_process)
    run_cli("compare", "--optimizers", "adamw", "--timeout", "2", "--output", str(tmp_path))
    assert seen == [2.0]
    assert "training.overwrite_output_dir=true" in compare.train_command(None, "adamw", 2, tmp_path)


# ---- 8. an unwritable output directory is found before the first step ------------------------------


def _refused_before_training(run, tmp_path, locked: Path, outputs: list[Path]) -> None:
    """``run`` (one of the ``optiplug`` command's runners) refuses each of ``outputs`` with one line naming
    ``locked``, in ``train`` and in ``validate`` alike."""
    for out in outputs:
        code, _, err = run("train", *FAST, f"training.output_dir={out}")
        assert code == 1
        assert err.startswith(f"optiplug: training.output_dir: cannot write in '{locked}' (")
        assert err.endswith("); choose a directory you can write\n") and "Traceback" not in err
        code, _, err2 = run("validate", str(_yaml(tmp_path)), f"training.output_dir={out}")
        assert code == 1 and err2 == err


def test_an_unwritable_output_directory_is_one_line_before_training(tmp_path):
    locked = read_only(tmp_path / "locked")
    try:  # a child process that file permissions bind, root included
        _refused_before_training(run_cli_unprivileged, tmp_path, locked, [locked, locked / "run"])
    finally:
        locked.chmod(0o755)
    assert not any(locked.iterdir())


def test_a_directory_no_one_can_write_in_is_one_line_everywhere(tmp_path):
    """Runs as root without chattr or mounts too: /proc takes no new entry, whoever asks."""
    _refused_before_training(run_cli, tmp_path, Path("/proc"), [Path("/proc") / "optiplug-run"])
    assert not (Path("/proc") / "optiplug-run").exists()


def test_an_output_directory_under_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli("train", f"training.output_dir={tmp_path / 'file' / 'run'}")
    assert code == 1 and err == (
        f"optiplug: training.output_dir: '{tmp_path / 'file' / 'run'}' is under the file '{tmp_path / 'file'}'; "
        "choose a directory\n"
    )


# ---- 9. validate makes every check train makes before its first step ---------------------------------


def _refused_configs(tmp_path: Path) -> list[list[str]]:
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    (tmp_path / "a-file").write_text("x")
    weights_only = tmp_path / "weights-only"
    tiny_model_dir(weights_only, tokenizer=False)
    return [
        [f"data.path={tmp_path / 'missing.jsonl'}"],
        [f"model.name_or_path={tmp_path / 'no-model'}"],
        [f"model.name_or_path={weights_only}"],
        [f"training.resume_from_checkpoint={tmp_path / 'no-checkpoint'}"],
        ["training.per_device_train_batch_size=0"],
        ["training.max_steps=0"],
        ["training.max_grad_norm=-.inf"],
        [f"training.output_dir={tmp_path / 'used'}"],
        [f"training.output_dir={tmp_path / 'a-file'}"],
        [f"training.output_dir={weights_only}", f"model.name_or_path={weights_only}", "model.tokenizer=embedded"],
        ["training.fsdp=full_shard"],
        ["optimizer.name=galor"],
        # the checks that need the model: run by validate on its skeleton (meta device)
        ["finetuning.type=freeze", "finetuning.trainable=[nothing_matches]"],
        ["data.block_size=2048"],
        ["optimizer.name=schedule_free_adamw", "scheduler.name=cosine"],
        ["optimizer.name=sgd", "optimizer.param_groups=[{match: nothing_matches, lr: 0.1}]"],
        ["optimizer.name=galore_adamw", "optimizer.target_modules=[nothing]"],
    ]


def test_validate_refuses_what_train_refuses_with_the_same_line(tmp_path):
    config = _yaml(tmp_path)
    for overrides in _refused_configs(tmp_path):
        out = [f"training.output_dir={tmp_path / 'out'}"]
        code, _, trained = run_cli("train", str(config), *out, *overrides)
        assert code == 1 and "Traceback" not in trained, (overrides, trained)
        code, _, validated = run_cli("validate", str(config), *out, *overrides)
        assert code == 1 and validated == trained, (overrides, validated, trained)
        assert not (tmp_path / "out").exists()


def test_a_model_directory_with_only_weights_is_one_whole_line(tmp_path):
    model = tiny_model_dir(tmp_path / "model", tokenizer=False)
    with pytest.raises(ConfigError) as info:
        optiplug.app.train(overrides=[f"model.name_or_path={model}", f"training.output_dir={tmp_path / 'out'}"])
    assert str(info.value) == (
        f"model.name_or_path: '{model}' has no tokenizer (no tokenizer.json or tokenizer_config.json); "
        "set model.tokenizer to a tokenizer directory"
    )


# ---- 10. a failed run leaves no empty directory -----------------------------------------------------


class _BrokenBuild:
    @optiplug.hookimpl
    def register_optimizers(self, register):
        from typing import Literal

        class BrokenConfig(optiplug.OptimizerConfig):
            name: Literal["broken_build"] = "broken_build"

        def build(ctx, cfg):
            raise ValueError("the kernel is not compiled for this CPU")

        register(optiplug.OptimizerEntry(config=BrokenConfig, build=build, summary="fails in build()"))


def test_a_plugin_whose_build_raises_is_one_line_and_leaves_no_directory(tmp_path, temp_plugin):
    temp_plugin(_BrokenBuild(), "acme-broken")
    out = tmp_path / "a" / "run"
    code, _, err = run_cli("train", *FAST, "optimizer.name=broken_build", f"training.output_dir={out}")
    assert code == 1 and last_line(err) == (
        "optiplug: optimizer 'broken_build' (plugin 'acme-broken') failed to build: "
        "ValueError: the kernel is not compiled for this CPU"
    )
    assert "Traceback" not in err
    assert not (tmp_path / "a").exists()  # nor the parent the run created
    code, _, err = run_cli("--debug", "train", *FAST, "optimizer.name=broken_build", f"training.output_dir={out}")
    assert code == 1 and "Traceback" in err and "ValueError: the kernel is not compiled" in err
    os.environ.pop("OPTIPLUG_DEBUG", None)
    with pytest.raises(PluginError):
        optiplug.build_optimizer(torch.nn.Linear(2, 2), "broken_build")


# ---- 11. one line instead of a traceback ------------------------------------------------------------


def test_a_truncated_model_file_is_one_line(tmp_path):
    model = tiny_model_dir(tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(CheckpointError) as info:
        optiplug.app.train(overrides=[f"model.name_or_path={model}", f"training.output_dir={tmp_path / 'out'}"])
    assert str(info.value).startswith(f"model.name_or_path: '{weights}' cannot be loaded: it is truncated (5000 of ")
    assert str(info.value).endswith(" bytes); copy or save the file again")


def test_a_truncated_optimizer_state_is_one_line(checkpointed, tmp_path):
    ckpt = tmp_path / "checkpoint-2"
    shutil.copytree(checkpointed / "checkpoint-2", ckpt)
    state = ckpt / "optimizer.pt"
    state.write_bytes(state.read_bytes()[:3000])
    with pytest.raises(CheckpointError) as info:
        optiplug.app.train(
            overrides=[*FAST, f"training.output_dir={tmp_path / 'r'}", f"training.resume_from_checkpoint={ckpt}"]
        )
    assert str(info.value) == (
        f"training.resume_from_checkpoint: '{state}' cannot be loaded: it is truncated or not a torch.save file; "
        "resume from another checkpoint"
    )


def test_a_model_without_trainable_parameters_is_one_line(tmp_path):
    from optiplug.factory import NO_TRAINABLE_PARAMETERS
    from optiplug.testing import TokenBlocks, tiny_llama, training_args

    model = tiny_llama()
    model.requires_grad_(False)
    trainer = optiplug.OptiTrainer(model=model, args=training_args(tmp_path), train_dataset=TokenBlocks())
    with pytest.raises(ConfigError) as info:
        trainer.check_optimizer()
    assert (
        str(info.value)
        == NO_TRAINABLE_PARAMETERS
        == (
            "the model has no trainable parameters (every parameter has requires_grad=False): unfreeze some "
            "(param.requires_grad_(True)) or add adapters; in a run config, check finetuning.trainable or "
            "finetuning.target_modules"
        )
    )
    with pytest.raises(ConfigError, match="no trainable parameters"):
        optiplug.build_optimizer(model, "adamw")


# ---- 12. Ctrl-C -------------------------------------------------------------------------------------


def test_an_interrupt_says_the_step_and_the_last_checkpoint(tmp_path, temp_plugin):
    def interrupt(trainer, state):
        if state.global_step == 3:
            raise KeyboardInterrupt

    temp_plugin(_Callback(interrupt), "ctrl-c")
    out = tmp_path / "run"
    code, _, err = run_cli("train", *FAST, "training.save_steps=2", f"training.output_dir={out}")
    assert code == 130
    assert last_line(err) == f"optiplug: interrupted at step 3; the last checkpoint is {out / 'checkpoint-2'}"
    assert json.loads((out / MARKER).read_text())["status"] == "interrupted"
    assert not (out / SUMMARY_FILE).exists()
    code, _, err = run_cli("train", *FAST, f"training.output_dir={tmp_path / 'unsaved'}")
    assert code == 130 and last_line(err) == "optiplug: interrupted at step 3; no complete checkpoint was saved"
    assert not (tmp_path / "unsaved").exists()  # it wrote nothing: the directory it created is gone


# Issue 19: real signals (os.kill of the process itself) from a callback, a patched save or a patched start-up
# step, never after a sleep; checkpoints are written whole or not at all.


def _kill_self(signum: int) -> None:
    os.kill(os.getpid(), signum)


@pytest.fixture
def sigint_handled():
    """SIGINT as in a terminal: a suite started in the background (``pytest &`` in a script, ``nohup``) inherits it
    ignored, and a run keeps an ignored signal ignored (tested below), so the Ctrl-C tests set Python's own handler."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _marker(out: Path) -> dict:
    return json.loads((out / MARKER).read_text())


def _complete_checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("checkpoint-*") if (p / "trainer_state.json").is_file())


@pytest.mark.parametrize(("signum", "code", "words"), [(signal.SIGINT, 130, "interrupted"),
                                                       (signal.SIGTERM, 143, "stopped by SIGTERM")])  # fmt: skip
def test_a_signal_mid_step_stops_the_run_with_its_step_and_last_checkpoint(
    tmp_path, temp_plugin, sigint_handled, signum, code, words
):
    def send(trainer, state):
        if state.global_step == 3:
            _kill_self(signum)

    temp_plugin(_Callback(send), "signal")
    out = tmp_path / "run"
    got, _, err = run_cli("train", *FAST, "training.save_steps=2", f"training.output_dir={out}")
    assert got == code
    assert last_line(err) == f"optiplug: {words} at step 3; the last checkpoint is {out / 'checkpoint-2'}"
    marker = _marker(out)
    assert marker["status"] == "interrupted" and marker.get("signal") == (
        "SIGTERM" if signum == signal.SIGTERM else None
    )
    assert not (out / SUMMARY_FILE).exists() and _complete_checkpoints(out) == ["checkpoint-2"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the run's handlers are gone after it


def test_sigterm_at_start_up_stops_before_anything_is_written(tmp_path, monkeypatch):
    import optiplug.app.data as data

    loaded = data.load_datasets

    def load_then_terminate(*args, **kwargs):
        result = loaded(*args, **kwargs)
        _kill_self(signal.SIGTERM)  # while the run tokenizes: before the output directory exists
        return result

    monkeypatch.setattr(data, "load_datasets", load_then_terminate)
    out = tmp_path / "run"
    code, _, err = run_cli("train", *FAST, f"training.output_dir={out}")
    assert code == 143 and last_line(err) == "optiplug: stopped by SIGTERM before training started"
    assert not out.exists()


def test_a_run_started_with_sigint_ignored_keeps_it_ignored(tmp_path, temp_plugin):
    """``nohup optiplug train &``: SIGINT was ignored when the run started, so it does not stop the run."""

    def send(trainer, state):
        if state.global_step == 3:
            _kill_self(signal.SIGINT)

    temp_plugin(_Callback(send), "signal")
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        code, _, err = run_cli("train", *FAST, f"training.output_dir={tmp_path / 'run'}")
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # and it is left as it was
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 0, err
    assert json.loads((tmp_path / "run" / SUMMARY_FILE).read_text())["steps"] == 4


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_save_leaves_no_checkpoint_that_looks_complete(tmp_path, monkeypatch, sigint_handled, signum):
    from transformers import Trainer

    saved = Trainer._save_rng_state

    def save_then_signal(self, output_dir):
        saved(self, output_dir)  # the model and optimizer state of checkpoint-4 are written: then the signal
        if self.state.global_step == 4:
            assert Path(output_dir).parent.name == PARTIAL  # written where nothing takes it for a checkpoint
            _kill_self(signum)

    monkeypatch.setattr(Trainer, "_save_rng_state", save_then_signal)
    out = tmp_path / "run"
    argv = ["train", *FAST, "training.max_steps=6", "training.save_steps=2", f"training.output_dir={out}"]
    code, _, err = run_cli(*argv)
    assert code == (130 if signum == signal.SIGINT else 143)
    assert last_line(err).endswith(f"at step 4; the last checkpoint is {out / 'checkpoint-2'}")
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name or p.name == PARTIAL) == ["checkpoint-2"]
    assert (out / "checkpoint-2" / CHECKPOINT_RECORD).is_file()  # written before the checkpoint was complete
    assert _marker(out)["status"] == "interrupted"

    monkeypatch.setattr(Trainer, "_save_rng_state", saved)
    code, _, err = run_cli(*argv, f"training.resume_from_checkpoint={out / 'checkpoint-2'}")
    assert code == 0, err
    assert _complete_checkpoints(out) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert json.loads((out / SUMMARY_FILE).read_text())["status"] == "finished"


def test_a_signal_mid_evaluation_stops_the_run(tmp_path, monkeypatch, sigint_handled):
    from transformers import Trainer

    predict = Trainer.prediction_step

    def predict_then_interrupt(self, *args, **kwargs):
        result = predict(self, *args, **kwargs)
        _kill_self(signal.SIGINT)  # during the first evaluation, after its first batch
        return result

    monkeypatch.setattr(Trainer, "prediction_step", predict_then_interrupt)
    out = tmp_path / "run"
    code, _, err = run_cli("train", *FAST, "data.eval_ratio=0.25", "training.eval_strategy=steps",
                           "training.eval_steps=2", "training.save_steps=1", f"training.output_dir={out}")  # fmt: skip
    assert code == 130
    # step 2 is evaluated before it is saved: checkpoint-2 was never started
    assert last_line(err) == f"optiplug: interrupted at step 2; the last checkpoint is {out / 'checkpoint-1'}"
    assert _marker(out)["status"] == "interrupted" and not (out / SUMMARY_FILE).exists()
    assert _complete_checkpoints(out) == ["checkpoint-1"]


def test_a_full_disk_during_a_checkpoint_reports_the_error_and_keeps_nothing_of_it(tmp_path, monkeypatch):
    """The save fails with ENOSPC, and so does recording the run's end: the first error is the one reported."""
    from transformers import Trainer

    from optiplug.app import safety

    disk = {"full": False}
    write_marker, saved = safety.write_marker, Trainer._save_rng_state

    def full(self, output_dir):
        if self.state.global_step < 4:
            return saved(self, output_dir)
        disk["full"] = True
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(output_dir) / "rng_state.pth"))

    def marker_full(out, data):
        if disk["full"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        write_marker(out, data)

    monkeypatch.setattr(Trainer, "_save_rng_state", full)
    monkeypatch.setattr(safety, "write_marker", marker_full)
    out = tmp_path / "run"
    code, _, err = run_cli("train", *FAST, "training.save_steps=2", f"training.output_dir={out}")
    assert code == 1
    assert f"optiplug: could not save checkpoint-4 in {str(out)!r} (OSError: [Errno 28] No space left on device: " \
           f"'{out / PARTIAL / 'checkpoint-4' / 'rng_state.pth'}'); nothing of it was kept and the last complete " \
           f"checkpoint is {out / 'checkpoint-2'}; free disk space (or choose another training.output_dir) and " \
           "train again" in err  # fmt: skip
    assert "optiplug: also, could not record the run's files in " in err  # after the save's own error
    assert _complete_checkpoints(out) == ["checkpoint-2"] and not (out / "checkpoint-4").exists()
    assert not (out / PARTIAL).exists()


def test_resuming_from_inside_an_unfinished_save_is_refused(tmp_path):
    partial = tmp_path / "run" / PARTIAL / "checkpoint-2"
    partial.mkdir(parents=True)
    (partial / "trainer_state.json").write_text("{}")
    code, _, err = run_cli("train", *FAST, f"training.resume_from_checkpoint={partial}",
                           f"training.output_dir={tmp_path / 'other'}")  # fmt: skip
    assert code == 1 and last_line(err) == (
        f"optiplug: training.resume_from_checkpoint: {str(partial)!r} is a checkpoint whose save was cut short; "
        "resume from a checkpoint-N directory of the output directory"
    )


# ---- the command in its own process -----------------------------------------------------------------

# Run `optiplug train` as a command; the child's SIGINT handling made Python's default whatever the test runner
# inherited (a shell starts a background job with SIGINT ignored, and so would the run be).
COMMAND = "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); " \
          "from optiplug.app.cli import main; sys.argv[0] = 'optiplug'; main()"  # fmt: skip


@pytest.mark.slow
def test_sigint_to_the_command(tmp_path):
    """The signal comes from outside, once the run has logged the step after its first checkpoint."""
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-c", COMMAND, "train", *FAST, "training.max_steps=100000", "training.save_steps=5",
         f"training.output_dir={out}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    logged = 0
    for line in process.stdout:  # one line per step (logging_steps=1, no progress bar)
        logged += line.startswith("{'loss'")
        if logged == 6:  # checkpoint-5 was saved before step 6 was logged
            break
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130, err[-2000:]
    assert last_line(err).startswith("optiplug: interrupted at step ")
    assert last_line(err).endswith(f"; the last checkpoint is {out / 'checkpoint-5'}") or "checkpoint-10" in err


@pytest.mark.slow
def test_a_second_signal_stops_at_once(tmp_path):
    """Ctrl-C at step 2, and again while the run cleans up: the process ends there, with 130."""
    script = tmp_path / "second.py"
    script.write_text(
        "import os, signal, sys\n"
        "from optiplug.app import safety\n"
        "from optiplug.app.trainer import GuardedTrainer\n"
        "step = GuardedTrainer.training_step\n"
        "def training_step(self, *args, **kwargs):\n"
        "    if self.state.global_step == 2:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return step(self, *args, **kwargs)\n"
        "GuardedTrainer.training_step = training_step\n"
        "def finish(self, status, **details):\n"
        "    os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, while the run records how it ended\n"
        "    raise AssertionError('still running after the second signal')\n"
        "safety.OutputDir.finish = finish\n" + COMMAND.replace("; ", "\n") + "\n"
    )
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, str(script), "train", *FAST, f"training.output_dir={out}"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 130, done.stderr[-2000:]
    assert done.stderr.rstrip().endswith("optiplug: stopped at once (second signal)")
    assert "still running" not in done.stderr


def test_jit_checkpoint_composes(tmp_path, temp_plugin):
    """transformers' enable_jit_checkpoint owns SIGTERM: its checkpoint is saved, the run ends as interrupted."""

    def send(trainer, state):
        if state.global_step == 2:
            _kill_self(signal.SIGTERM)
            for callback in trainer.callback_handler.callbacks:  # its 3 s grace period, without waiting 3 s
                manager = getattr(callback, "jit_manager", None)
                if manager is not None:
                    manager._enable_checkpoint()

    temp_plugin(_Callback(send), "jit")
    out = tmp_path / "run"
    code, _, err = run_cli("train", *FAST, "training.max_steps=6", "training.enable_jit_checkpoint=true",
                           f"training.output_dir={out}")  # fmt: skip
    assert code == 143, err
    assert last_line(err).startswith("optiplug: stopped by SIGTERM at step ")
    assert _complete_checkpoints(out) and not (out / SUMMARY_FILE).exists()
    assert _marker(out)["status"] == "interrupted"


# ---- 13. plugin status tells the truth --------------------------------------------------------------


class _NoLiteral:
    @optiplug.hookimpl
    def register_optimizers(self, register):
        class Nameless(optiplug.OptimizerConfig):
            name: str = "nameless"

        register(optiplug.OptimizerEntry(config=Nameless, build=lambda ctx, cfg: None))


class _SecondAdamw:
    def __init__(self, entry):
        self.entry = entry

    @optiplug.hookimpl
    def register_optimizers(self, register):
        register(self.entry)


def test_plugins_shows_registration_failures_and_duplicates(temp_plugin):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from optiplug.registry import registry

        temp_plugin(_NoLiteral(), "acme-nameless")
        temp_plugin(_SecondAdamw(optiplug.get_entry("adamw")), "acme-adamw")
        failures = {f.name: f.cause for f in registry.failures()}
        code, out, _ = run_cli("plugins")
        code_json, text, _ = run_cli("plugins", "--json")
        code_list, listing, _ = run_cli("list")
    assert set(failures) >= {"acme-nameless", "acme-adamw"}
    assert failures["acme-adamw"].startswith("optimizer 'adamw' is registered twice, by plugins ")
    assert (
        code == 0
        and f"acme-adamw (registered at run time): register_optimizers\n  FAILED {failures['acme-adamw']}" in out
    )
    # a plugin whose register hook raised is left out whole: listed as failed, not as loaded
    assert f"\nFAILED acme-nameless: {failures['acme-nameless']}" in out and "acme-nameless (" not in out
    loaded = {p["name"]: p for p in json.loads(text)["loaded"]}
    assert code_json == 0 and loaded["acme-adamw"]["failures"] == [failures["acme-adamw"]]
    assert "acme-nameless" not in loaded
    assert {"name": "acme-nameless", "cause": failures["acme-nameless"]} in json.loads(text)["failed"]
    assert loaded["optiplug:optimizers"]["failures"] == []
    # only the duplicated name is blocked: every other name and command keeps working
    assert code_list == 0 and "\nsgd " in listing and "\nadamw " not in listing
    with pytest.raises(optiplug.DuplicateNameError, match="optimizer 'adamw' is registered twice"):
        optiplug.get_entry("adamw")
    optiplug.build_optimizer(torch.nn.Linear(2, 2), "sgd", lr=0.1)


# ---- 14. small truths ---------------------------------------------------------------------------------


def test_the_documented_defaults_are_the_codes():
    from optiplug.app.run import default_training_arguments

    defaults = default_training_arguments()
    text = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    for key in ("max_steps", "logging_steps", "per_device_train_batch_size", "seed"):
        assert f"`{key}: {defaults[key]}`" in text, key
    assert f"`output_dir: {defaults['output_dir']}`" in text


def test_final_loss_is_the_last_logged_loss_and_says_when(tmp_path):
    result = optiplug.app.train(overrides=[*FAST, "training.logging_steps=3", f"training.output_dir={tmp_path / 'r'}"])
    assert result.summary["final_loss_step"] == 3 and result.summary["steps"] == 4
    assert result.summary["final_loss"] == dict(result.losses)[3]
    assert result.summary["status"] == "finished"


def test_estimate_of_a_missing_path_does_not_suggest_downloading_it():
    code, _, err = run_cli("estimate", "model.name_or_path=/nope")
    assert code == 1 and err == "optiplug: model.name_or_path: the directory '/nope' does not exist\n"
