"""The bridge itself: the committed catalogue, listing without torch, generated configs, conversions,
the Muon grouping, checks, the two schedules, and a Trainer run that resumes exactly."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from optiplug_pytorch_optimizer import NO_ESTIMATE, PREFIX
from optiplug_pytorch_optimizer.catalogue import specs
from optiplug_pytorch_optimizer.left_out import LEFT_OUT

import optiplug
from optiplug.testing import TokenBlocks, logged_losses, tiny_llama, training_args

PLUGIN = Path(__file__).resolve().parents[1]
REPO = PLUGIN.parents[1]


def test_catalogue_matches_the_installed_pytorch_optimizer():
    """catalogue.json is what generate.py writes from the installed pytorch-optimizer (names, fields, defaults)."""
    from optiplug_pytorch_optimizer import generate

    assert generate.main(["--check"]) == 0, "regenerate: python -m optiplug_pytorch_optimizer.generate"


def test_every_optimizer_of_the_registry_is_bridged_or_left_out_with_a_reason():
    from pytorch_optimizer.optimizer import OPTIMIZERS

    bridged = {spec.source for spec in specs().values()}
    assert bridged | set(LEFT_OUT) == set(OPTIMIZERS)
    assert not bridged & set(LEFT_OUT)
    assert all(len(reason) > 40 for reason in LEFT_OUT.values())
    registered = {row.name for row in optiplug.list_optimizers() if row.plugin == "optiplug-pytorch-optimizer"}
    assert registered == {PREFIX + source for source in bridged}
    assert all(name.startswith(PREFIX) for name in registered)


def test_readme_gives_the_count_and_every_left_out_optimizer_with_its_reason():
    readme = (PLUGIN / "README.md").read_text(encoding="utf-8")
    assert f"**{len(specs())} optimizers**" in readme
    for source, reason in LEFT_OUT.items():
        assert f"| `{source}` | {reason} |" in readme, source
    for source in NO_ESTIMATE:
        assert f"`po_{source}`" in readme, source
    for example in ("pytorch-optimizer-lion.yaml", "pytorch-optimizer-muon-rex.yaml"):
        assert example in readme and (REPO / "examples" / example).is_file()


def test_listing_the_bridge_imports_neither_torch_nor_pytorch_optimizer():
    code = (
        "import sys, optiplug\n"
        "names = [r.name for r in optiplug.list_optimizers()]\n"
        "optiplug.get_entry('po_lion').config.model_json_schema()\n"
        "print(len(names), sorted(m for m in ('torch', 'transformers', 'pytorch_optimizer') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) > len(specs()) and out[1:] == ["[]"]


def test_optiplug_list_builds_no_generated_config_class():
    code = (
        "from optiplug.app.cli import main\n"
        "from optiplug_pytorch_optimizer.catalogue import BridgedConfig\n"
        "try:\n    main(['list'])\nexcept SystemExit:\n    pass\n"
        "before = len(BridgedConfig.__subclasses__())\n"
        "import optiplug\n"
        "fields = optiplug.get_entry('po_lion').config.model_fields\n"
        "print(before, len(BridgedConfig.__subclasses__()), 'betas' in fields)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[-3:] == ["0", "1", "True"]  # built only when a config is read, one class per entry read


def test_generated_config_fields_types_and_checks():
    fields = optiplug.get_entry("po_lion").config.model_fields
    assert {"lr", "betas", "weight_decay", "weight_decouple", "fixed_decay", "foreach", "maximize"} <= set(fields)
    cfg = optiplug.parse_optimizer({"name": "po_lion", "lr": 3e-4, "betas": [0.95, 0.98]})
    assert cfg.betas == (0.95, 0.98) and cfg.lr == 3e-4
    assert optiplug.parse_optimizer("po_adan").betas == (0.98, 0.92, 0.99)
    with pytest.raises(optiplug.ConfigError, match="unknown field"):
        optiplug.parse_optimizer({"name": "po_lion", "lrr": 1e-3})
    with pytest.raises(optiplug.ConfigError, match="greater than 0"):
        optiplug.parse_optimizer({"name": "po_lion", "lr": 0})
    with pytest.raises(optiplug.ConfigError, match="Input should be"):
        optiplug.parse_optimizer({"name": "po_a2grad", "variant": "nope"})
    # a field the optimizer's own type names: dtype names, enum member names
    assert optiplug.parse_optimizer("po_adafactor").momentum_dtype == "bfloat16"
    assert optiplug.parse_optimizer("po_scion", norm_type="spectral").norm_type == "spectral"


def test_every_generated_config_builds_with_its_defaults_and_has_a_json_schema():
    for name in specs():
        config = optiplug.get_entry(name).config
        assert config().name == name
        assert json.dumps(config.model_json_schema())


def test_schema_show_and_validate_through_the_command_line():
    schema = subprocess.run(
        [sys.executable, "-m", "optiplug", "schema"], capture_output=True, text=True, check=True
    ).stdout
    assert '"po_lion"' in schema and '"po_rex"' in schema
    show = subprocess.run(
        [sys.executable, "-m", "optiplug", "show", "po_soap"], capture_output=True, text=True, check=True
    ).stdout
    assert "precondition_frequency" in show and "pytorch-optimizer" in show
    for example in ("pytorch-optimizer-lion.yaml", "pytorch-optimizer-muon-rex.yaml"):
        subprocess.run(
            [sys.executable, "-m", "optiplug", "validate", str(REPO / "examples" / example)],
            check=True,
            capture_output=True,
        )
    checked = subprocess.run(
        [
            sys.executable,
            "-m",
            "optiplug",
            "validate",
            str(REPO / "examples" / "pytorch-optimizer-lion.yaml"),
            "optimizer.name=po_lionn",
        ],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 1 and "po_lion" in checked.stderr


def test_conversions_to_the_constructors_arguments():
    import math

    import torch
    from optiplug_pytorch_optimizer.factory import kwargs_of

    def kwargs(name: str, **fields):
        return kwargs_of(specs()[name], optiplug.parse_optimizer(name, **fields))

    assert kwargs("po_adafactor")["momentum_dtype"] is torch.bfloat16
    assert kwargs("po_kron", mu_dtype="float32")["mu_dtype"] is torch.float32
    assert kwargs("po_prodigy")["growth_rate"] == math.inf
    assert kwargs("po_prodigy", growth_rate=1.02)["growth_rate"] == 1.02
    norm = kwargs("po_scion", norm_type="spectral")["norm_type"]
    assert type(norm) is int and norm == 2  # LMONorm.SPECTRAL, as a plain int (weights_only loads it)


def test_muon_groups_are_pytorch_optimizers_own():
    from pytorch_optimizer.optimizer.muon.utils import prepare_muon_parameters

    model = tiny_llama()
    theirs = prepare_muon_parameters(model, "muon", lr=0.02, weight_decay=0.0)
    ours = optiplug.build_optimizer(model, "po_muon")
    for group_ours, group_theirs in zip(ours.param_groups, theirs.param_groups, strict=True):
        assert group_ours["use_muon"] == group_theirs["use_muon"]
        assert [id(p) for p in group_ours["params"]] == [id(p) for p in group_theirs["params"]]
        assert (group_ours["lr"], group_ours["weight_decay"]) == (group_theirs["lr"], group_theirs["weight_decay"])


def test_checks_refuse_before_the_first_step_with_what_to_change(tmp_path):
    from transformers import TrainingArguments

    model = tiny_llama()
    no_steps = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(optiplug.ConfigError, match=r"set optimizer.num_iterations or training.max_steps"):
        optiplug.get_entry("po_ranger21").check(optiplug.BuildContext(model=model, args=no_steps), _cfg("po_ranger21"))
    with pytest.raises(optiplug.ConfigError, match=r"2-D weight matrices only.*finetuning.type: lora"):
        optiplug.build_optimizer(model, "po_spectralsphere")
    with pytest.raises(optiplug.ConfigError, match=r"remove optimizer.param_groups"):
        optiplug.build_optimizer(model, {"name": "po_muon", "param_groups": [{"match": "lm_head", "lr_scale": 2}]})


def test_estimate_is_unknown_with_per_group_options_and_measured_without():
    from optiplug_pytorch_optimizer.factory import Unknown

    shapes = optiplug.ParamShape.of_model(tiny_llama())
    entry = optiplug.get_entry("po_sgdw")
    plain = entry.state_bytes(shapes, _cfg("po_sgdw", momentum=0.9))
    scaled = entry.state_bytes(
        shapes, _cfg("po_sgdw", momentum=0.9, param_groups=[{"match": "lm_head", "lr_scale": 2}])
    )
    assert plain == scaled > 0
    with pytest.raises(Unknown, match="per-group options"):
        entry.state_bytes(shapes, _cfg("po_sgdw", param_groups=[{"match": "lm_head", "momentum": 0.5}]))


def _cfg(name: str, **fields):
    return optiplug.parse_optimizer(name, **fields)


def test_rex_is_pytorch_optimizers_rex_curve_on_every_group():
    """Equal to REXScheduler from the second step on (its first step runs at min_lr, po_rex's at the peak)."""
    import torch
    from optiplug_pytorch_optimizer.schedulers import RexConfig, build_rex
    from pytorch_optimizer import REXScheduler

    def rates(make, peaks=(0.1,)):
        optimizer = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in peaks])
        scheduler = make(optimizer)
        seen = []
        for _ in range(25):
            seen.append([group["lr"] for group in optimizer.param_groups])
            optimizer.step()
            scheduler.step()
        return seen

    theirs = rates(lambda o: REXScheduler(o, total_steps=20, max_lr=0.1, min_lr=0.0))
    ours = rates(lambda o: build_rex(optiplug.ScheduleContext(o, 20), RexConfig()))
    assert theirs[0] == [0.0]
    assert ours[0] == [0.1]
    assert [lr for (lr,) in ours[1:]] == pytest.approx([lr for (lr,) in theirs[1:]], rel=1e-12)
    two = rates(lambda o: build_rex(optiplug.ScheduleContext(o, 20), RexConfig()), peaks=(0.1, 0.02))
    assert all(b == pytest.approx(a / 5, rel=1e-12) for a, b in two)


def test_warmup_stable_decay_defaults_and_phases():
    import torch
    from optiplug_pytorch_optimizer.schedulers import WarmupStableDecayConfig, build_wsd

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    cfg = WarmupStableDecayConfig(warmup_steps=2)
    scheduler = build_wsd(optiplug.ScheduleContext(optimizer, 10), cfg)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # 2 warmup steps, stable until the last 20% (2 steps), then the 1-sqrt cooldown
    assert rates[:2] == [0.0, 0.5] and rates[2:8] == [1.0] * 6
    assert rates[8] == pytest.approx(1.0) and rates[9] == pytest.approx(1 - 0.5**0.5)
    with pytest.raises(optiplug.ConfigError, match="not both"):
        optiplug.parse_scheduler({"name": "po_warmup_stable_decay", "warmup_steps": 1, "warmup_ratio": 0.1})


@pytest.mark.parametrize(
    ("optimizer", "scheduler"),
    [
        ({"name": "po_adashift", "keep_num": 2, "lr": 3e-3}, {"name": "po_warmup_stable_decay", "warmup_steps": 2}),
        ({"name": "po_ranger21", "lr": 3e-3}, {"name": "po_rex"}),
    ],
    ids=["adashift-deque-state", "ranger21-num-iterations-from-the-run"],
)
def test_trainer_resumes_exactly_from_a_weights_only_checkpoint(optimizer, scheduler, tmp_path):
    """Through the Trainer: AdaShift's gradient queue (a deque) and Ranger21's run-filled num_iterations."""
    import torch

    warnings.simplefilter("ignore")
    steps = 8

    def trainer(path, **overrides):
        return optiplug.OptiTrainer(
            model=tiny_llama(seed=0),
            args=training_args(path, max_steps=steps, **overrides),
            train_dataset=TokenBlocks(n=32, distinct=4),
            optimizer=optimizer,
            scheduler=scheduler,
        )

    full = trainer(tmp_path / "full", save_strategy="steps", save_steps=steps // 2)
    full.train()
    checkpoint = tmp_path / "full" / f"checkpoint-{steps // 2}"
    torch.load(checkpoint / "optimizer.pt", weights_only=True)
    reference = logged_losses(full)
    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    after = {step: loss for step, loss in logged_losses(resumed).items() if step > steps // 2}
    assert after == {step: reference[step] for step in range(steps // 2 + 1, steps + 1)}
