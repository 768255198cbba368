"""Generate ``catalogue.json``: every optimizer of pytorch-optimizer's registry, its constructor's fields.

Run after changing the pinned pytorch-optimizer version::

    python -m optiplug_pytorch_optimizer.generate            # rewrites catalogue.json beside this file
    python -m optiplug_pytorch_optimizer.generate --check    # exits 1 when the committed file is stale

``optiplug list`` reads the committed file, so listing the bridge's ~115 optimizers imports neither
torch nor pytorch-optimizer. This module imports both (it inspects the classes).

Each constructor parameter becomes a config field: its name, its default, and a type written in a
small vocabulary (``float``, ``int``, ``bool``, ``str``, ``None``, ``Any``, ``tuple[...]``,
``list[...]``, ``dict[str, Any]``, ``Literal[...]`` and unions of them) that
:mod:`optiplug_pytorch_optimizer.catalogue` turns back into Python types without importing torch.
Parameters a YAML file cannot express (callables, process groups, tensors sets, the parameters or the
model themselves) are left to the optimizer's own default. Conversions the factory applies are
recorded per field (``convert``): a ``torch.dtype`` is written by its name, an enum by its member's
name, an infinite default as ``None``.
"""

from __future__ import annotations

import argparse
import enum
import inspect
import json
import math
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

from optiplug_pytorch_optimizer.left_out import LEFT_OUT

__all__ = ["CATALOGUE", "catalogue", "main"]

CATALOGUE = Path(__file__).with_name("catalogue.json")

# Constructor parameters that are not configuration: what the bridge passes itself, or options
# that only make sense outside a Trainer step (autograd through the step, CUDA graphs).
NOT_CONFIG = {"self", "params", "model", "optimizer", "kwargs", "differentiable", "capturable", "process_group"}
# The Muon family takes parameter groups flagged ``use_muon``; the bridge builds them with the
# package's own rule (``prepare_muon_parameters``).
MUON = {"muon", "adamuon", "adago", "normuon"}
DTYPES = ("float32", "bfloat16", "float16", "float64")


class Unsupported(Exception):
    """An annotation with no YAML spelling (a callable, a tensor, a process group)."""


def _render(annotation: Any) -> str:
    """The annotation in the catalogue's type vocabulary; raises :class:`Unsupported`."""
    import torch

    if annotation is inspect.Parameter.empty or annotation is Any:
        return "Any"
    if annotation is None or annotation is type(None):
        return "None"
    if annotation in (bool, int, float, str):
        return annotation.__name__
    if annotation is dict:
        return "dict[str, Any]"
    if annotation is torch.dtype:
        return f"Literal[{', '.join(repr(d) for d in DTYPES)}]"
    if annotation is torch.Tensor:
        raise Unsupported("tensor")
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return f"Literal[{', '.join(repr(a) for a in args)}]"
    if origin in (typing.Union, types.UnionType):
        members: list[str] = []
        for arg in args:
            try:
                rendered = _render(arg)
            except Unsupported:
                continue  # e.g. ``float | torch.Tensor`` -> float, ``float | Callable | None`` -> float | None
            if rendered not in members:
                members.append(rendered)
        if not members or members == ["None"]:
            raise Unsupported(str(annotation))
        return " | ".join(members)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"tuple[{_render(args[0])}, ...]"
        return f"tuple[{', '.join(_render(a) for a in args)}]"
    if origin is list:
        return f"list[{_render(args[0])}]"
    if origin is dict:
        return "dict[str, Any]"
    raise Unsupported(str(annotation))


def _mentions(annotation: Any, target: Any) -> bool:
    """True when ``target`` is ``annotation`` or one of its union members."""
    return annotation is target or target in typing.get_args(annotation)


def _docstring_args(doc: str | None) -> dict[str, str]:
    """``{argument: description}`` from a Google-style ``Args:`` section (``name (type): text`` or ``name: text``)."""
    if not doc:
        return {}
    descriptions: dict[str, str] = {}
    in_args, current, indent = False, None, None
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped in ("Args:", "Arguments:", "Parameters:"):
            in_args, current, indent = True, None, None
            continue
        if not in_args:
            continue
        if not stripped:
            continue
        level = len(line) - len(line.lstrip())
        if indent is None:
            indent = level
        if level < indent:
            break
        match = re.match(r"^\*{0,2}(\w+)\s*(\([^)]*\))?\s*:\s*(.*)$", stripped)
        if level == indent and match:
            current = match.group(1)
            descriptions[current] = match.group(3).strip()
        elif current is not None:
            descriptions[current] = f"{descriptions[current]} {stripped}".strip()
    return {name: " ".join(text.split()) for name, text in descriptions.items()}


def _summary(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    first = doc.strip().split("\n\n")[0]
    return " ".join(first.split()).rstrip(".") or cls.__name__


def _field(parameter: inspect.Parameter, description: str) -> dict[str, Any]:
    import torch

    default = parameter.default
    field: dict[str, Any] = {"name": parameter.name, "description": description}
    if isinstance(default, torch.dtype) or _mentions(parameter.annotation, torch.dtype):
        rendered = _render(parameter.annotation)
        if isinstance(default, torch.dtype):
            default = str(default).removeprefix("torch.")
            if default not in DTYPES:
                raise Unsupported(f"dtype {default}")
        field.update(type=rendered, default=default, convert="dtype")
        return field
    if isinstance(default, enum.Enum):
        names = [member.name.lower() for member in type(default)]
        field.update(type=f"Literal[{', '.join(repr(n) for n in names)}]", default=default.name.lower())
        field["convert"] = f"enum:{type(default).__module__}:{type(default).__qualname__}"
        return field
    rendered = _render(parameter.annotation)
    if default is inspect.Parameter.empty:
        field.update(type=f"{rendered} | None", default=None, required=True)
        return field
    if isinstance(default, float) and math.isinf(default):
        field.update(type=f"{rendered} | None", default=None, convert="inf")
        field["description"] = f"{description} None: unbounded (infinity).".strip()
        return field
    if isinstance(default, tuple):
        default = list(default)
    if not (default is None or isinstance(default, (bool, int, float, str, list, dict))):
        raise Unsupported(f"default {default!r}")
    field.update(type=rendered, default=default)
    return field


def _entry(name: str, cls: type) -> dict[str, Any]:
    descriptions = _docstring_args(inspect.getdoc(cls))
    signature = inspect.signature(cls.__init__)  # type: ignore[misc]  # the constructor of a class, not an instance
    fields, skipped = [], []
    for parameter in signature.parameters.values():
        if parameter.name in NOT_CONFIG or parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
            continue
        try:
            fields.append(_field(parameter, descriptions.get(parameter.name, "")))
        except Unsupported:
            if parameter.default is inspect.Parameter.empty:
                raise
            skipped.append(parameter.name)
    return {
        "class": f"{cls.__module__}:{cls.__qualname__}",
        "summary": _summary(cls),
        "takes": "muon" if name in MUON else "params",
        "fields": fields,
        "not_configurable": skipped,
    }


def catalogue() -> dict[str, Any]:
    """The catalogue of the installed pytorch-optimizer (what ``catalogue.json`` must hold)."""
    import importlib.metadata

    from pytorch_optimizer.optimizer import OPTIMIZERS

    return {
        "pytorch_optimizer_version": importlib.metadata.version("pytorch-optimizer"),
        "optimizers": {name: _entry(name, cls) for name, cls in sorted(OPTIMIZERS.items()) if name not in LEFT_OUT},
        "left_out": sorted(name for name in OPTIMIZERS if name in LEFT_OUT),
    }


def dumps(data: dict[str, Any]) -> str:
    """The committed file's text: sorted keys, two-space indent, a final newline."""
    return json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write (or with ``--check``, compare) ``catalogue.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the committed catalogue is stale")
    options = parser.parse_args(argv)
    text = dumps(catalogue())
    if options.check:
        current = CATALOGUE.read_text(encoding="utf-8") if CATALOGUE.is_file() else ""
        if current != text:
            print(f"{CATALOGUE} is stale: run python -m optiplug_pytorch_optimizer.generate", file=sys.stderr)
            return 1
        return 0
    CATALOGUE.write_text(text, encoding="utf-8")
    print(f"wrote {CATALOGUE} ({len(json.loads(text)['optimizers'])} optimizers)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
