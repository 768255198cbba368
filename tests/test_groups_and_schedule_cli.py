"""`optiplug train --dry-run`, `validate --groups`, `show` (the no-decay rule) and `optiplug schedule`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from optiplug.app.testing import run_cli
from optiplug.errors import ConfigError

GROUPS_YAML = """\
optimizer:
  name: adamw
  lr: 3.0e-3
  weight_decay: 0.01
  param_groups:
    - {match: embed_tokens, lr_scale: 0.1, weight_decay: 0.0}
    - {match: 'layers\\.0\\.', lr: 1.0e-3, name: first_layer}
"""

GROUPS_TABLE = """\
parameter groups of optimizer 'adamw' on embedded:
  group         pattern       tensors  parameters  lr      weight_decay
  default       (unmatched)   7        212,992     0.003   0.01
  default       (unmatched)   3        384         0.003   0
  embed_tokens  embed_tokens  1        262,144     0.0003  0
  first_layer   layers\\.0\\.   7        212,992     0.001   0.01
  first_layer   layers\\.0\\.   2        256         0.001   0
weight decay: 0 on the parameters of nn.LayerNorm modules and on every parameter whose lower-cased name contains \
'bias', 'layernorm', 'rmsnorm' or '_norm', or has a 'norm' component ('model.norm.weight'); the optimizer's \
weight_decay on the rest (transformers' Trainer.get_decay_parameter_names).
"""


def test_train_dry_run_prints_the_groups_and_trains_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text(GROUPS_YAML + "training:\n  output_dir: out\n")
    code, out, err = run_cli("train", "run.yaml", "--dry-run")
    assert (code, out) == (0, GROUPS_TABLE), err
    assert err.strip().endswith("optiplug: dry run, nothing trained")
    assert not (tmp_path / "out").exists()


def test_validate_groups_prints_the_same_table_and_refuses_a_pattern_that_matches_nothing(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(GROUPS_YAML)
    code, out, _ = run_cli("validate", str(path), "--groups")
    assert code == 0 and out == GROUPS_TABLE + f"{path}: ok (optimizer adamw, scheduler cosine)\n"
    code, out, err = run_cli("validate", str(path), "--groups", "optimizer.param_groups=[{match: lm_head}]")
    assert code == 1 and out == ""
    # the embedded model ties its output head to the embedding: there is no lm_head parameter to match
    assert err.startswith(
        "optiplug: optimizer.param_groups[0]: match 'lm_head' matches no trainable parameter (a regex searched "
        "in each name); the names are: model.embed_tokens.weight, model.layers.*.self_attn.q_proj.weight,"
    )


def test_show_says_what_the_no_decay_rule_is_and_lists_param_groups_after_the_own_fields():
    code, out, _ = run_cli("show", "sgd")
    lines = out.splitlines()
    assert code == 0 and lines[-1] == GROUPS_TABLE.splitlines()[-1].replace("\\", "")
    fields = [line.split(":")[0].strip() for line in lines[lines.index("fields:") + 1 : -1]]
    assert fields[:2] == ["lr", "momentum"] and "param_groups" in fields[-3:]


SCHEDULE_OUT = """\
warmup_stable_decay (warmup_steps=10, decay_ratio=0.2, min_lr_ratio=0.1), 100 steps: learning rate as a multiple \
of optimizer.lr
  step   1  0.1
  step   5  0.46
  step  10  0.91
  step  25  1
  step  50  1
  step  75  1
  step  90  0.620396
  step  95  0.285497
  step 100  0.10554
  peak 1 at steps 11-81; last 0.10554
"""


def test_schedule_prints_points_and_draws_the_curve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(
        "schedule", "warmup_stable_decay", "warmup_steps=10", "decay_ratio=0.2", "min_lr_ratio=0.1",
        "--steps", "100",
    )  # fmt: skip
    assert code == 0, err
    assert out == SCHEDULE_OUT + "wrote schedule-warmup_stable_decay.png\n"
    png = (tmp_path / "schedule-warmup_stable_decay.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    code, out, _ = run_cli("schedule", "cosine", "--steps", "4", "--output", str(tmp_path / "c.png"))
    assert code == 0 and (tmp_path / "c.png").is_file() and out.endswith(f"wrote {tmp_path / 'c.png'}\n")


def test_warmup_stable_decay_lengths_from_the_run_or_given():
    from optiplug.app.schedule import schedule_rates

    rates = schedule_rates({"name": "warmup_stable_decay", "warmup_steps": 10, "decay_type": "linear"}, 100)
    # steps 11-91 at the peak, then the default decay, ceil(0.1 x 100) = 10 steps, linear to 0
    assert rates[10:91] == [1.0] * 81 and rates[91:] == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    rates = schedule_rates(
        {"name": "warmup_stable_decay", "warmup_steps": 10, "stable_steps": 20, "decay_steps": 30}, 100
    )
    assert rates[10:31] == [1.0] * 21 and 0 < rates[31] < 1 and rates[60:] == [0.0] * 40  # then at the floor
    assert rates[:10] == pytest.approx([i / 10 for i in range(10)])
    with pytest.raises(ConfigError, match=r"^scheduler 'warmup_stable_decay': warmup \(60\) and decay \(50\) steps"):
        schedule_rates({"name": "warmup_stable_decay", "warmup_steps": 60, "decay_ratio": 0.5}, 100)
    with pytest.raises(ConfigError, match=r"^scheduler.decay_steps|^scheduler: set decay_steps or decay_ratio"):
        schedule_rates({"name": "warmup_stable_decay", "decay_steps": 5, "decay_ratio": 0.5}, 100)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["cosin", "--steps", "10"], "optiplug: unknown scheduler 'cosin'. Did you mean 'cosine'?"),
        (
            ["cosine", "warmup_ratio=2", "--steps", "10"],
            "optiplug: scheduler.warmup_ratio: Input should be less than 1",
        ),
        (
            ["cosine", "warmup", "--steps", "10"],
            "optiplug: expected FIELD=VALUE, got 'warmup' (e.g. warmup_ratio=0.05)",
        ),
        (
            ["reduce_lr_on_plateau", "--steps", "10"],
            "optiplug: scheduler 'reduce_lr_on_plateau' lowers the rate when the evaluation metric stops improving: "
            "its curve depends on the run, so there is none to draw",
        ),
        (["cosine", "--steps", "10", "-o", "/no/such/dir/x.png"], "optiplug: --output: the directory '/no/such/dir'"),
    ],
)
def test_schedule_errors_are_one_line(tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli("schedule", *argv)
    assert code == 1 and out == "" and err.startswith(message), err
    assert list(tmp_path.iterdir()) == []


def test_schedule_help_imports_no_torch():
    code = (
        "import sys\nfrom optiplug.app.cli import main\n"
        "try:\n    main(['schedule', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_the_configuration_docs_show_what_the_commands_print(tmp_path):
    import re
    from pathlib import Path

    import optiplug.app

    text = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    assert GROUPS_YAML in blocks
    for block in (b for b in blocks if "param_groups" in b):
        (tmp_path / "run.yaml").write_text(block)
        assert optiplug.app.load_config(tmp_path / "run.yaml").optimizer.param_groups
    console = next(b for b in re.findall(r"```console\n(.*?)```", text, flags=re.S) if "--dry-run" in b)
    assert console.splitlines()[1:8] == GROUPS_TABLE.splitlines()[:7]
