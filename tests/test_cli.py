"""The `optiplug` command: each command, its --help, its errors, and its import weight."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest

import optiplug
from optiplug.app.testing import run_cli


@pytest.mark.parametrize("command", ["train", "list", "show", "schema", "validate", "plugins", "estimate", "compare"])
def test_every_command_has_help(command):
    code, out, _ = run_cli(command, "--help")
    assert code == 0 and "Usage: optiplug " + command in out


def test_list_table_and_json():
    code, out, _ = run_cli("list")
    assert code == 0 and "adamw" in out and "cosine" in out and "optiplug:optimizers" in out
    code, out, _ = run_cli("list", "--json", "--kind", "scheduler")
    rows = json.loads(out)
    assert code == 0 and {r["kind"] for r in rows} == {"scheduler"}
    assert {"name", "kind", "plugin", "summary", "requires"} <= set(rows[0])


def test_list_rejects_a_bad_kind():
    code, _, err = run_cli("list", "--kind", "optimiser")
    assert code == 1 and err == "optiplug: --kind must be 'optimizer' or 'scheduler', got 'optimiser'\n"


def test_show_fields():
    code, out, _ = run_cli("show", "sgd")
    assert code == 0
    assert out.startswith("sgd  (optimizer, plugin optiplug:optimizers)")
    assert "  momentum: float = 0.9  # Momentum factor (0 keeps no optimizer state)." in out
    code, out, _ = run_cli("show", "cosine")
    assert code == 0 and "warmup_steps: int = 0" in out
    code, out, _ = run_cli("show", "adamw")  # helper types read as written, without their checks
    assert "  layerwise: supported\n" in out
    assert "  betas: tuple[float, float] = (0.9, 0.999)  # " in out
    assert "  kernel: Literal['auto', 'fused', 'foreach', 'for-loop'] = 'auto'" in out


def test_show_unknown_name_is_one_line():
    code, out, err = run_cli("show", "adamww")
    assert code == 1 and out == ""
    assert err.startswith("optiplug: unknown optimizer or scheduler 'adamww'. Did you mean 'adamw'")
    assert "Traceback" not in err


def test_schema_is_json_schema():
    code, out, _ = run_cli("schema")
    schema = json.loads(out)
    assert code == 0 and schema["title"] == "RunConfig"
    assert set(schema["properties"]) == {
        "model",
        "data",
        "training",
        "optimizer",
        "scheduler",
        "finetuning",
        "cooldown",
        "guard",
    }


def test_validate_ok_and_errors(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("optimizer: {name: sgd, lr: 0.1}\ntraining: {max_steps: 5, per_device_train_batch_size: 2}\n")
    code, out, _ = run_cli("validate", str(good))
    assert code == 0 and out == f"{good}: ok (optimizer sgd, scheduler cosine)\n"
    code, _, err = run_cli("validate", str(good), "training.max_stepz=3")
    assert (
        code == 1
        and err
        == "optiplug: training.max_stepz: not an argument of transformers.TrainingArguments. Did you mean 'max_steps'?\n"
    )
    code, _, err = run_cli("validate", str(good), "scheduler.name=cosine", "training.lr_scheduler_kwargs={}")
    assert code == 1 and "remove training.lr_scheduler_kwargs or the scheduler section" in err
    code, _, err = run_cli("validate", str(good), "training.per_device_train_batch_size=lots")
    assert (
        code == 1
        and err
        == "optiplug: training.per_device_train_batch_size: Input should be a valid integer, unable to parse string as an integer (got 'lots')\n"
    )
    code, _, err = run_cli("validate", str(good), "training.save_strategy=sometimes")
    assert code == 1 and err.startswith("optiplug: training.save_strategy: sometimes is not a valid SaveStrategy")
    code, _, err = run_cli("validate", str(tmp_path / "missing.yaml"))
    assert code == 1 and err == f"optiplug: config file '{tmp_path / 'missing.yaml'}' does not exist\n"


def test_train_rejects_bad_config_before_doing_anything(tmp_path):
    out_dir = tmp_path / "out"
    code, _, err = run_cli("train", f"training.output_dir={out_dir}", "optimizer.name=galor")
    assert code == 1 and err.startswith("optiplug: unknown optimizer 'galor'")
    assert not out_dir.exists()
    code, _, err = run_cli("train", "optimizer.lr=1", "not-an-override")
    assert code == 1 and err == "optiplug: expected KEY=VALUE overrides after the config file, got 'not-an-override'\n"


def test_plugins_command():
    code, out, _ = run_cli("plugins")
    assert code == 0 and "optiplug:optimizers (optiplug 0.1.0): register_optimizers" in out
    code, out, _ = run_cli("plugins", "--json")
    data = json.loads(out)
    assert code == 0 and data["failed"] == [] and any(p["name"] == "optiplug:schedulers" for p in data["loaded"])


@pytest.mark.parametrize("command", [["list"], ["show", "adamw"], ["schema"], ["plugins"]])
def test_light_commands_do_not_import_torch_or_transformers(command):
    code = (
        "import sys\n"
        "from optiplug.app.cli import main\n"
        f"try:\n    main({command!r})\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "HEAVY []" in result.stderr


PLUGIN_CONFIG_MODULES = sorted(
    f"{path.parent.name}.config"
    for path in (Path(__file__).resolve().parents[1] / "plugins").glob("*/src/optiplug_*/config.py")
)


def test_list_builds_no_config_class_of_a_plugin_with_a_config_module():
    """The plugins name their config classes with LazyConfig.from_module: `optiplug list` imports no config module
    (building their pydantic classes is start-up time), `show` imports the one it shows; the plugin package still
    gives its config classes as attributes."""
    code = (
        "import sys\n"
        "from optiplug.app.cli import main\n"
        "def imported():\n"
        f"    return [m for m in {PLUGIN_CONFIG_MODULES!r} if m in sys.modules]\n"
        "try:\n    main(['list'])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print('LIST', imported(), file=sys.stderr)\n"
        "try:\n    main(['show', 'galore_adamw'])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print('SHOW', imported(), file=sys.stderr)\n"
        "import optiplug_torchao\n"
        "entry = optiplug.get_entry('torchao_adamw8bit')\n"
        "print('ATTRIBUTE', optiplug_torchao.TorchaoAdamW8bitConfig is entry.config, file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", "import optiplug\n" + code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.split(" ")[0] in ("LIST", "SHOW", "ATTRIBUTE")]
    assert lines[0] == "LIST []" and lines[-2] == "SHOW ['optiplug_galore.config']" and lines[-1] == "ATTRIBUTE True"


def test_list_builds_no_config_class_of_any_entry():
    """The default plugin names its config classes with LazyConfig.from_module, as the plugins do: `optiplug list`
    imports no optiplug.builtin.configs and builds no entry's config class (a class with a name literal) of the
    default plugin or of any installed plugin, only bases; `show` builds the one it shows; the default plugin's
    classes stay importable from the modules that registered them."""
    code = (
        "import sys\n"
        "import optiplug\n"
        "from optiplug.app.cli import main\n"
        "def built():\n"
        "    found, todo = set(), [optiplug.OptimizerConfig, optiplug.SchedulerConfig]\n"
        "    while todo:\n"
        "        cls = todo.pop()\n"
        "        todo.extend(cls.__subclasses__())\n"
        "        if isinstance(cls.model_fields['name'].default, str):\n"
        "            found.add(f'{cls.__module__}:{cls.__name__}')\n"
        "    return sorted(found)\n"
        "try:\n    main(['list'])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print('LIST', 'optiplug.builtin.configs' in sys.modules, built(), file=sys.stderr)\n"
        "try:\n    main(['show', 'cosine'])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print('SHOW', built(), file=sys.stderr)\n"
        "from optiplug.builtin.optimizers import AdamWConfig, SGDConfig\n"
        "from optiplug.builtin.schedulers import WarmupStableDecayConfig\n"
        "from optiplug.builtin.transformers import AdafactorConfig, AdafactorScheduleConfig\n"
        "same = [optiplug.get_entry('adamw').config is AdamWConfig, optiplug.get_entry('sgd').config is SGDConfig,\n"
        "        optiplug.get_scheduler_entry('warmup_stable_decay').config is WarmupStableDecayConfig,\n"
        "        optiplug.get_entry('adafactor').config is AdafactorConfig,\n"
        "        optiplug.get_scheduler_entry('adafactor').config is AdafactorScheduleConfig]\n"
        "print('ATTRIBUTES', same, file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.split(" ")[0] in ("LIST", "SHOW", "ATTRIBUTES")]
    assert lines[0] == "LIST False []"
    assert "optiplug.builtin.configs:CosineConfig" in lines[1], lines[1]
    assert lines[2] == f"ATTRIBUTES {[True] * 5}"


def test_console_script_exits_nonzero_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", "from optiplug.app.cli import main; main()", "train", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == f"optiplug: config file '{tmp_path / 'nope.yaml'}' does not exist"


def test_list_ends_with_the_count_of_each_plugin():
    code, out, _ = run_cli("list")
    lines = out.splitlines()
    rows = optiplug.list_optimizers() + optiplug.list_schedulers()
    assert code == 0 and len(lines) == len(rows) + 2  # header, one line per entry, the counts
    optimizers, schedulers = len(optiplug.list_optimizers()), len(optiplug.list_schedulers())
    assert lines[-1].startswith(f"{optimizers} optimizers and {schedulers} schedulers from ")
    default = sum(1 for row in rows if row.plugin.startswith("optiplug:"))
    ours = [r for r in optiplug.list_optimizers() if r.plugin.startswith("optiplug:")]
    assert f"optiplug {len(ours)} + {default - len(ours)}" in lines[-1]


class _DemoMomentum(optiplug.OptimizerConfig):
    name: Literal["demo_momentum"] = "demo_momentum"
    momentum: float = 0.9


class _AliasedPlugin:
    @optiplug.hookimpl
    def register_optimizers(self, register):
        aliases = (
            optiplug.Alias("demo_heavy_ball", {"momentum": 0.99}, summary="heavy ball"),
            optiplug.Alias("demo_nag", {}),
            optiplug.Alias("demo_momentum", {"momentum": 0.0}, transformers=True),
            optiplug.Alias("demo_sgd_hf", {"momentum": 0.0}, transformers=True),
        )
        register(optiplug.OptimizerEntry(config=_DemoMomentum, build=print, summary="demo", aliases=aliases))


def test_list_and_show_tell_aliases(temp_plugin):
    temp_plugin(_AliasedPlugin(), "aliased")
    code, out, _ = run_cli("list", "demo")
    row = "demo_momentum  optimizer  aliased  demo; also: demo_heavy_ball, demo_nag; transformers: demo_momentum, demo_sgd_hf"
    assert code == 0 and out.splitlines()[1] == row and len(out.splitlines()) == 3
    code, out, _ = run_cli("list", "--json", "heavy")
    [listed] = json.loads(out)
    assert listed["aliases"][0] == {
        "name": "demo_heavy_ball",
        "preset": {"momentum": 0.99},
        "transformers": False,
        "summary": "heavy ball",
    }
    code, out, _ = run_cli("show", "demo_heavy_ball")
    assert out.startswith(
        "demo_heavy_ball: an alias of optimizer 'demo_momentum' with momentum=0.99\n  heavy ball\n"
        "demo_momentum  (optimizer, plugin aliased)\n"
    )
    assert "  transformers' name demo_sgd_hf: momentum=0.0\n" in out
    code, out, _ = run_cli("show", "demo_momentum")  # the canonical entry, listing transformers' meaning
    assert out.startswith("demo_momentum  (optimizer, plugin aliased)\n")
    assert "  transformers' name demo_momentum: momentum=0.0\n" in out


def test_list_filters_by_plugin_and_name():
    code, out, _ = run_cli("list", "--plugin", "optiplug", "--kind", "optimizer")
    names = [line.split()[0] for line in out.splitlines()[1:-1]]
    assert code == 0 and names == sorted(
        r.name
        for r in optiplug.list_optimizers()
        if r.plugin.startswith("optiplug:")  # the default plugin's modules
    )
    code, out, _ = run_cli("list", "--plugin", "optiplug-galore", "adafactor")
    assert code == 0 and [line.split()[0] for line in out.splitlines()[1:-1]] == ["galore_adafactor"]
    code, out, err = run_cli("list", "no-such-name")
    assert code == 0 and out == "" and err == "optiplug: no optimizer or scheduler matches\n"
    code, _, err = run_cli("list", "--plugin", "acme")
    assert code == 1 and err.startswith("optiplug: --plugin 'acme' registered nothing; plugins with entries: ")
    assert "optiplug-galore" in err
