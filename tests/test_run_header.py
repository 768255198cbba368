"""The run header: what a run will do, printed after the optimizer is built and before the first step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import optiplug
import optiplug.app
from optiplug import GROUP_ROLE, ParamShape
from optiplug.app.header import format_header, run_plan
from optiplug.testing import TokenBlocks, tiny_llama, training_args

# One optimizer of each shipped family, with the roles its groups carry (None: the family labels none).
FAMILIES = {
    "adamw": None,
    "sgd": None,
    "badam": {"adamw on the active block"},
    "galore_adamw": {"galore rank 128", "full rank (not a target)"},
    "apollo_mini": {"apollo rank 1 (tensor-wise)", "adamw (not a target)"},
    "adam_mini": {"one second moment per head", "one second moment per row", "one second moment per tensor"},
    "loraplus": {"lora A (lr)", "lora B, 1-D (lr x 16)"},
    "muon": {"muon", "adamw (not a hidden matrix)"},
    "schedule_free_adamw": None,
    "po_lion": None,
}
DESCRIBED = {"badam", "galore_adamw", "apollo_mini", "adam_mini", "loraplus", "muon"}


def _trainer(name, tmp_path, **fields):
    """A trainer whose optimizer and scheduler are built, and the trainable parameters from before that."""
    model = tiny_llama()
    if name == "loraplus":
        from optiplug.app.adapters import apply_finetuning
        from optiplug.app.config import FinetuningConfig

        model = apply_finetuning(model, FinetuningConfig(type="lora"))
    trainer = optiplug.OptiTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=10),
        train_dataset=TokenBlocks(n=8),
        optimizer=name,
        **fields,
    )
    shapes = ParamShape.of_model(model)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    return trainer, shapes


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_header_says_what_each_optimizer_family_does(name, tmp_path):
    trainer, shapes = _trainer(name, tmp_path)
    plan = run_plan(trainer, 10, shapes=shapes)
    text = format_header(plan)
    model, entry, cfg = trainer.model, trainer.optimizer_entry, trainer.optimizer_config
    # what the run trains: every parameter, or the LoRA adapters (BAdam freezes all but its active block now)
    trainable = sum(p.numel() for n, p in model.named_parameters() if name != "loraplus" or "lora_" in n)
    assert plan["model"]["trainable_parameters"] == trainable
    assert f"{sum(p.numel() for p in model.parameters()):,} parameters" in text
    assert text.splitlines()[2].split()[:2] == ["optimizer", name]
    if name in DESCRIBED:  # the entry's own line, as estimate prints it
        line = entry.describe(shapes, cfg)
        assert plan["optimizer"]["describe"] == line and line in [row.strip() for row in text.splitlines()]
    if name == "badam":  # both layers, though BAdam has frozen all but the active one by now
        assert plan["optimizer"]["describe"].startswith("badam: 2 blocks, one trained at a time")
    groups = plan["optimizer"]["groups"]
    assert sum(row["parameters"] for row in groups) == trainable  # every trainable parameter, in exactly one group
    roles = {row["role"] for row in groups}
    assert roles == (FAMILIES[name] or {None})
    built = {group.get(GROUP_ROLE) for group in optiplug.unwrap_optimizer(trainer.optimizer).param_groups}
    assert built == roles
    schedule = trainer.scheduler_config.name
    assert f"scheduler  {schedule}: " in text and plan["steps"] == 10


def test_the_header_lists_changed_fields_groups_by_label_and_the_resolved_schedule(tmp_path):
    trainer = optiplug.OptiTrainer(
        model=tiny_llama(),
        args=training_args(tmp_path, max_steps=10, save_strategy="steps", save_steps=5, save_total_limit=2),
        train_dataset=TokenBlocks(n=8),
        optimizer={"name": "adamw", "lr": 3e-3, "param_groups": [{"match": "embed_tokens", "lr_scale": 0.1}]},
        scheduler={"name": "warmup_stable_decay", "warmup_steps": 2, "decay_steps": 3, "min_lr_ratio": 0.1},
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    text = format_header(run_plan(trainer, 10))
    lines = {line.split()[0]: line for line in text.splitlines()[1:] if line.startswith("  ") and line[2] != " "}
    assert lines["optimizer"].endswith("adamw (param_groups: 1 rule, lr=0.003)")
    assert "groups: default (" in text and "embed_tokens (1 tensor, 4,096, lr 0.0003)" in text
    assert lines["scheduler"].endswith(
        "warmup_stable_decay: warmup 2 + stable 5 + decay 3 steps (linear warmup, cosine decay to 0.1 x lr)"
    )
    assert "4 sequences per device x 1 accumulation x 1 process = 4 sequences per step" in lines["batch"]
    assert lines["output"].endswith("a checkpoint every 5 steps (checkpoint-N), the last 2 kept")


FAST = [
    "data.block_size=16",
    "data.max_blocks=32",
    "training.max_steps=3",
    "training.per_device_train_batch_size=4",
    "training.logging_steps=1",
    "training.disable_tqdm=true",
]


def test_optiplug_train_muon_shows_the_split_and_trainable_parameters_before_the_first_step(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(  # stdout (the log lines) and stderr (the header) in the order they were written
        [sys.executable, "-m", "optiplug", "train", "optimizer.name=muon", *FAST, f"training.output_dir={out}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    output = result.stdout
    assert result.returncode == 0, output[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    plan = summary["plan"]
    muon = "muon: 14 matrices (0.43M parameters) · adamw: 6 tensors (0.26M)"
    assert plan["optimizer"]["describe"] == muon
    assert plan["model"]["trainable_parameters"] == summary["trainable_parameters"] == 688_768
    header = format_header(plan)
    assert header in output
    lines = [" ".join(line.split()) for line in header.splitlines()]
    assert lines[:5] == [
        "optiplug run:",
        "model embedded (LlamaForCausalLM, float32): 688,768 parameters, all trainable; full fine-tuning",
        "optimizer muon (defaults)",
        muon,
        "groups: muon (14 tensors, 0.43M, lr 0.02) · adamw (not a hidden matrix) (6 tensors, 0.26M, lr 0.03)",
    ]
    # before the first step: the first step's log line comes after it
    assert output.index(header) + len(header) < output.index("{'loss'") < output.index("optiplug: done")


def test_quiet_prints_no_header_and_keeps_the_plan(tmp_path, capsys):
    result = optiplug.app.train(overrides=[*FAST, f"training.output_dir={tmp_path / 'run'}"], quiet=True)
    out, err = capsys.readouterr()
    assert "optiplug run:" not in err and "{'loss'" not in out + err
    assert result.summary["plan"]["optimizer"]["name"] == "adamw"
    assert result.summary["plan"]["scheduler"]["describe"] == "cosine decay to 0 over 3 steps"
