"""YAML values, read by YAML 1.2's core schema, for config files and ``key=value`` overrides.

PyYAML implements YAML 1.1, where ``no``, ``yes``, ``on`` and ``off`` are booleans
(``save_strategy: no`` became ``False``) and ``5e-1`` is a string. Here only ``true``/``false``
are booleans, ``null``/``~``/empty are null, and numbers follow YAML 1.2 (``5e-1``, ``.inf``,
``0x1f``, ``0o17``; ``010`` is ten). Every number read keeps the text it was written as: its ``str()``
is that text (its ``repr()``, arithmetic and JSON are the number's), so a field whose type is text gets the
text the user typed (``run_name: 1e3`` is ``"1e3"``, not ``"1000.0"``: the contract fits a number to a text
field with ``str``, :func:`optiplug.configs.coerce_scalar`). :func:`plain` turns them into Python's numbers
where they leave the config (``TrainingArguments``).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

__all__ = ["ScalarFloat", "ScalarInt", "load_yaml", "plain", "scalar"]


class ScalarInt(int):
    """An integer read from YAML; ``str()`` gives the text it was written as (``0x1f``)."""

    source_text: str

    def __str__(self) -> str:
        return self.source_text


class ScalarFloat(float):
    """A float read from YAML; ``str()`` gives the text it was written as (``1e3``, ``.inf``)."""

    source_text: str

    def __str__(self) -> str:
        return self.source_text


def plain(value: Any) -> Any:
    """``value`` as Python's own number when it is a number read from YAML (its ``str()`` is Python's again)."""
    if isinstance(value, ScalarInt):
        return int(value)
    if isinstance(value, ScalarFloat):
        return float(value)
    return value


class _Core12Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 core-schema booleans, integers and floats."""


_Core12Loader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Core12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Core12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789")
)
_Core12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> ScalarInt:
    text = str(loader.construct_scalar(node))
    base = 8 if text.startswith("0o") else 16 if text.startswith("0x") else 10
    value = ScalarInt(int(text[2:] if base != 10 else text, base))
    value.source_text = text
    return value


def _float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> ScalarFloat:
    text = str(loader.construct_scalar(node))
    value = ScalarFloat(float(text.lower().replace(".inf", "inf").replace(".nan", "nan")))
    value.source_text = text
    return value


def _bool(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> bool:
    return str(loader.construct_scalar(node)).lower() == "true"


_Core12Loader.add_constructor("tag:yaml.org,2002:int", _int)
_Core12Loader.add_constructor("tag:yaml.org,2002:float", _float)
_Core12Loader.add_constructor("tag:yaml.org,2002:bool", _bool)


def load_yaml(text: str) -> Any:
    """Parse a YAML document with the core schema of YAML 1.2 (safe: no tags that run code)."""
    return yaml.load(text, Loader=_Core12Loader)


def scalar(text: str) -> Any:
    """The value of one ``key=value`` override: a YAML 1.2 scalar (or flow collection); unparsable text stays text."""
    if not text.strip():
        return ""
    try:
        return load_yaml(text)
    except yaml.YAMLError:
        return text
