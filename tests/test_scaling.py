"""docs/scaling.md's table of optimizers x engines is the registry's truth: each cell's verdict is what the checks say.

The table is parsed; for every row (its optimizers, its settings) and every engine (DDP, DeepSpeed ZeRO-0..3,
FSDP version 1 and 2, 2 processes) the checks a run goes through before its first step (``optiplug.factory.check_optimizer``,
the one check path: the entry's ``check``, the core's layerwise and offload rules, ...) run on a tiny Llama with that engine's ``TrainingArguments`` fields:
a "refused" cell must be refused with a message carrying its quoted words, any other cell must pass (with the
settings the cell names, such as ``max_grad_norm: 0``). Every registered optimizer and every bridged one must
have a row, and every "tested here" cell a note naming test files that exist. No training: checks only.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

import optiplug
from optiplug.factory import check_optimizer

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "scaling.md"
ENGINES = {"DDP": "ddp", "ZeRO-0": "zero0", "ZeRO-1": "zero1", "ZeRO-2": "zero2", "ZeRO-3": "zero3",
           "FSDP1": "fsdp1", "FSDP2": "fsdp2"}  # fmt: skip
VERDICTS = ("tested here", "allowed", "refused: ")
BRIDGE = "optiplug-pytorch-optimizer"


def _table() -> tuple[list[str], list[list[str]]]:
    lines = DOC.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| optimizer | DDP |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return [cell.strip() for cell in lines[start].strip().strip("|").split(" | ")], rows


def _notes() -> dict[int, str]:
    """The numbered notes after the table, by number."""
    text = DOC.read_text()
    text = text[text.index("| optimizer | DDP |") :]
    found = re.findall(r"^(\d+)\. (.*?)(?=^\d+\. |^\S|\Z)", text, flags=re.M | re.S)
    return {int(number): body for number, body in found}


def _settings(cell: str) -> dict[str, Any]:
    """The ``key: value`` settings quoted in backticks in ``cell``."""
    settings = {}
    for quoted in re.findall(r"`([^`]+)`", cell):
        if ": " in quoted:
            settings.update(yaml.safe_load(quoted))
    return settings


def _bridged() -> dict[str, str]:
    """Every bridged optimizer's name -> its class: elementwise, across, or deepspeed (refused there only)."""
    from optiplug_pytorch_optimizer import sharding
    from optiplug_pytorch_optimizer.catalogue import specs

    classes = {}
    for name, spec in specs().items():
        if spec.source in sharding.WHOLE_TENSOR:
            classes[name] = "across"
        elif spec.source in sharding.DEEPSPEED_ONLY:
            classes[name] = "deepspeed"
        else:
            classes[name] = "elementwise"
    return classes


def _names(label: str) -> list[str]:
    """The optimizers a row is about: its names in backticks, or a class of the bridge (``po_*``)."""
    if "`po_*`" in label:
        wanted = "elementwise" if "elementwise" in label else "across"
        names = sorted(name for name, kind in _bridged().items() if kind == wanted)
        count = re.search(r"\((\d+) of (\d+)\)", label)
        assert count and [int(count[1]), int(count[2])] == [len(names), len(_bridged())], (label, len(names))
        return names
    return [quoted for quoted in re.findall(r"`([^`]+)`", label) if ": " not in quoted]


def _arguments(engine: str, settings: dict[str, Any]) -> SimpleNamespace:
    """The ``TrainingArguments`` fields the checks read, for 2 processes under ``engine`` (``"none"``: 1 process)."""
    deepspeed = None
    if engine.startswith("zero"):
        zero: dict[str, Any] = {"stage": int(engine[-1])}
        if "reduce_scatter" in settings:
            zero["reduce_scatter"] = settings["reduce_scatter"]
        deepspeed = {"zero_optimization": zero}
    fsdp = engine.startswith("fsdp")
    return SimpleNamespace(
        world_size=1 if engine == "none" else 2,
        deepspeed=deepspeed,
        hf_deepspeed_config=None,
        fsdp="full_shard" if fsdp else "",
        fsdp_config={"version": int(engine[-1])} if fsdp else {},
        gradient_accumulation_steps=1,
        max_grad_norm=settings.get("max_grad_norm", 1.0),
        lr_scheduler_type="constant",
        warmup_steps=0,
        warmup_ratio=0.0,
        fp16=False,
        bf16=False,
    )


def _model(lora: bool) -> Any:
    from optiplug.testing import tiny_llama

    model = tiny_llama()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    return model


def _verdict(name: str, fields: dict[str, Any], engine: str, cell_settings: dict[str, Any], model: Any) -> str | None:
    """None when every check passes, else the refusal's message (also one process's: a refusal of the setting in
    one process, such as a bridged optimizer that needs its run length, is not the engine's, as in estimate)."""
    entry = optiplug.get_entry(name)
    cfg = optiplug.parse_optimizer({"name": name, **fields})
    ctx = optiplug.BuildContext(model=model, args=_arguments(engine, cell_settings))
    try:
        check_optimizer(entry, ctx, cfg)
    except optiplug.ConfigError as error:
        message = " ".join(str(error).split())
        if engine != "none" and message == _verdict(name, fields, "none", cell_settings, model):
            return None
        return message
    return None


HEADER, ROWS = _table()
CELLS = [(row[0], engine, cell) for row in ROWS for engine, cell in zip(HEADER[1:], row[1:])]


def test_the_table_has_one_column_per_engine_and_a_verdict_in_every_cell():
    assert ["optimizer", *ENGINES] == HEADER
    assert all(len(row) == len(HEADER) for row in ROWS), [row[0] for row in ROWS if len(row) != len(HEADER)]
    assert [cell for _, _, cell in CELLS if not cell.startswith(VERDICTS)] == []
    assert [cell for _, _, cell in CELLS if cell.startswith("refused") and not re.search(r'"[^"]+"', cell)] == []


@pytest.fixture(scope="module")
def models() -> dict[bool, Any]:
    return {False: _model(False), True: _model(True)}


@pytest.mark.parametrize(("label", "column", "cell"), CELLS, ids=[f"{row}-{col}" for row, col, _ in CELLS])
def test_each_cell_is_what_the_checks_say(label, column, cell, models):
    fields = _settings(label)
    model = models["LoRA" in label]
    settings = _settings(cell) if not cell.startswith("refused") else {}
    wrong = {}
    for name in _names(label):
        message = _verdict(name, fields, ENGINES[column], settings, model)
        if cell.startswith("refused"):
            words = " ".join(re.search(r'"([^"]+)"', cell)[1].split())  # type: ignore[index]
            if message is None or words not in message:
                wrong[name] = message
        elif message is not None:
            wrong[name] = message
    assert wrong == {}, f"{label} under {column}: the table says {cell!r}"


ESTIMATE = {"DDP": "ddp", "ZeRO-1": "zero1", "ZeRO-2": "zero2", "ZeRO-3": "zero3", "FSDP2": "fsdp"}


@pytest.mark.parametrize("column", list(ESTIMATE))
def test_optiplug_estimate_marks_what_the_table_refuses(column, models):
    """``optiplug estimate --nproc 2 --engine E`` runs the same checks: refused exactly where the table says so (cells
    with a setting estimate cannot express, such as reduce_scatter, left out)."""
    from optiplug.app.estimate import engine_check

    wrong = []
    for row in ROWS:
        cell = row[HEADER.index(column)]
        settings = _settings(cell) if not cell.startswith("refused") else {}
        if set(settings) - {"max_grad_norm"}:
            continue
        for name in _names(row[0]):
            model, fields = models["LoRA" in row[0]], _settings(row[0])
            if _verdict(name, fields, "none", {}, model) is not None:
                continue  # refused in one process too (a bridged optimizer needing its run length): not the engine's
            cfg = optiplug.parse_optimizer({"name": name, **fields})
            got = engine_check(
                models["LoRA" in row[0]], cfg, 2, ESTIMATE[column], 1, settings.get("max_grad_norm", 1.0)
            )
            if (got or "").startswith("refused") != cell.startswith("refused"):
                wrong.append((name, got))
    assert wrong == []


def test_every_registered_optimizer_has_a_row():
    named = {name for row in ROWS for name in _names(row[0])}
    registered = {row.name for row in optiplug.list_optimizers()}
    assert sorted(registered - named) == []
    assert sorted(named - registered) == []


def test_every_bridged_optimizer_is_in_the_row_of_its_class():
    rows = {name: row[0] for row in ROWS for name in _names(row[0]) if name.startswith("po_")}
    assert sorted(rows) == sorted(_bridged())
    for name, kind in _bridged().items():
        if kind == "deepspeed":
            assert "`po_*`" not in rows[name], name  # its own row: refused under DeepSpeed only


def test_every_tested_cell_names_tests_that_exist():
    notes = _notes()
    for label, column, cell in CELLS:
        if not cell.startswith("tested here"):
            continue
        number = int(re.search(r"\((\d+)\)$", cell)[1])  # type: ignore[index]
        paths = re.findall(r"(?:tests|plugins/\w+/tests)/[\w/]*?test_\w+\.py", notes.get(number, ""))
        assert paths, (label, column, number)
        missing = [path for path in paths if not (ROOT / path).is_file()]
        assert missing == [], (label, column, missing)
