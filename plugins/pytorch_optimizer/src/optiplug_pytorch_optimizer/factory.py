"""Building a bridged optimizer, and measuring its state without allocating (imports torch).

The factory turns a generated config back into the constructor's keyword arguments (dtype and enum
names, ``None`` for an infinite default), builds the parameter groups optiplug builds for every
optimizer (decay and no-decay, as transformers' Trainer splits them) or, for the Muon family,
pytorch-optimizer's own ``use_muon`` grouping, and wraps the class so that its state dict holds only
tensors and plain types (a ``collections.deque`` in the state is saved as a list and restored).
"""

from __future__ import annotations

import importlib
import math
import re
from collections import deque
from collections.abc import Sequence
from typing import Any

import optiplug
from optiplug_pytorch_optimizer.catalogue import FROM_RUN, Spec, specs

__all__ = [
    "Unknown",
    "build",
    "check",
    "constructor",
    "kwargs_of",
    "measured_state_bytes",
    "meta_state_bytes",
    "muon_groups",
    "stand_in_state_bytes",
]

# Module types whose >= 2-D weights pytorch-optimizer's prepare_muon_parameters gives to Muon (not "head" ones).
MUON_MODULES = ("Linear", "Conv1d", "LSTM", "Conv2d")
# Optimizers whose state grows over the first steps: the estimate runs this field's value + 3 steps.
GROWS_FOR = {"adashift": "keep_num"}
_MAXLEN = ".maxlen"
# Optimizers that keep their state in the weights' dtype and give NaN with bfloat16 weights.
BFLOAT16_NAN = {
    "adai": (
        "Adai keeps its state in the weights' dtype, and with bfloat16 weights its bias correction underflows to a "
        "division by zero (NaN weights from the first steps): train in float32 (model.dtype: float32)"
    )
}


def _import(path: str) -> Any:
    module, qualname = path.split(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


# Objects kept in a state whose attributes are tensors, plain values, enums and more such objects: saved as a dict
# of them (marked with the class's key here) and rebuilt on load. Only these classes are ever rebuilt from a checkpoint.
_UTILS = "pytorch_optimizer.optimizer.utils"
_STATE_OBJECTS = {
    "galore_projector": f"{_UTILS}.galore:GaLoreProjector",
    "pre_conditioner": f"{_UTILS}.preconditioner:PreConditioner",
    "block_partitioner": f"{_UTILS}.partition:BlockPartitioner",
    "graft": f"{_UTILS}.graft:Graft",
    "sgd_graft": f"{_UTILS}.graft:SGDGraft",
    "sqrtn_graft": f"{_UTILS}.graft:SQRTNGraft",
    "adagrad_graft": f"{_UTILS}.graft:AdaGradGraft",
    "rmsprop_graft": f"{_UTILS}.graft:RMSPropGraft",
}
_OBJECT_KEY = "optiplug_object"


def _packable(value: Any) -> str | None:
    """The ``_STATE_OBJECTS`` key of ``value``'s class, or None."""
    cls = type(value)
    return next((key for key, path in _STATE_OBJECTS.items() if path == f"{cls.__module__}:{cls.__qualname__}"), None)


def _pack(value: Any) -> Any:
    """``value`` with every listed object turned into a dict of its attributes and every int enum into an int."""
    import enum

    if (kind := _packable(value)) is not None:
        return {_OBJECT_KEY: kind, **{name: _pack(item) for name, item in vars(value).items()}}
    if isinstance(value, enum.IntEnum):
        return int(value)
    if isinstance(value, dict):
        return {key: _pack(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_pack(item) for item in value)
    return value


def _unpack(value: Any) -> Any:
    """:func:`_pack` undone: a dict marked with a listed class's key becomes that object again."""
    if isinstance(value, dict):
        if value.get(_OBJECT_KEY) in _STATE_OBJECTS:
            cls = _import(_STATE_OBJECTS[value[_OBJECT_KEY]])
            obj = cls.__new__(cls)
            obj.__dict__.update({name: _unpack(item) for name, item in value.items() if name != _OBJECT_KEY})
            return obj
        return {key: _unpack(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_unpack(item) for item in value)
    return value


def _holds_object(value: Any) -> bool:
    if _packable(value) is not None:
        return True
    if isinstance(value, dict):
        return any(_holds_object(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_object(item) for item in value)
    return False


def _resumable(original: Any) -> type:
    """``original`` with a state dict of tensors and plain types.

    A ``deque`` in a state is saved as a list (and its ``maxlen``); an object of a class in
    ``_STATE_OBJECTS`` (Conda's GaLore projector, ScalableShampoo's preconditioner and graft) as a dict of its
    attributes. Both are restored on load.
    """

    def state_dict(self: Any) -> dict[str, Any]:
        state_dict = original.state_dict(self)
        if not isinstance(state_dict.get("state"), dict):
            return state_dict  # a wrapper's own layout (Magma keeps its base optimizer's under another key)
        packed = {}
        for key, state in state_dict["state"].items():
            if isinstance(state, dict) and any(isinstance(v, deque) or _holds_object(v) for v in state.values()):
                state = dict(state)  # the packed state shares the live dicts: never change those
                for name, value in list(state.items()):
                    if isinstance(value, deque):
                        state[name], state[name + _MAXLEN] = list(value), value.maxlen
                    elif _holds_object(value):
                        state[name] = _pack(value)
            packed[key] = state
        return {**state_dict, "state": packed}

    def load_state_dict(self: Any, state_dict: dict[str, Any]) -> None:
        original.load_state_dict(self, state_dict)
        for state in self.state.values():
            if not isinstance(state, dict):
                continue
            for name in [key for key in state if isinstance(key, str) and key.endswith(_MAXLEN)]:
                base = name.removesuffix(_MAXLEN)
                state[base] = deque(state[base], maxlen=state.pop(name))
            for name, value in list(state.items()):
                if isinstance(value, dict):
                    state[name] = _unpack(value)

    namespace = {
        "state_dict": state_dict,
        "load_state_dict": load_state_dict,
        "__module__": original.__module__,
        "__qualname__": original.__qualname__,
        "__doc__": original.__doc__,
    }
    return type(original.__name__, (original,), namespace)


_CLASSES: dict[str, type] = {}


def constructor(spec: Spec) -> type:
    """pytorch-optimizer's class for ``spec``, subclassed so its state dict is ``weights_only``-readable.

    The subclass keeps the class's name; only ``state_dict``/``load_state_dict`` change, and only
    for states holding a ``deque`` (AdaShift's gradient queue) or a listed object (see :func:`_resumable`).
    """
    if spec.cls not in _CLASSES:
        _CLASSES[spec.cls] = _resumable(_import(spec.cls))
    return _CLASSES[spec.cls]


def _convert(field: dict[str, Any], value: Any) -> Any:
    convert = field.get("convert")
    if convert == "dtype":
        import torch

        return None if value is None else getattr(torch, value)
    if convert == "inf":
        return math.inf if value is None else value
    if convert and convert.startswith("enum:"):
        _, module, qualname = convert.split(":")
        member = getattr(_import(f"{module}:{qualname}"), value.upper())
        # an IntEnum member would be pickled into param_groups: a plain int compares equal and loads weights_only
        return int(member) if isinstance(member, int) else member
    return value


def kwargs_of(spec: Spec, cfg: Any, ctx: optiplug.BuildContext | None = None) -> dict[str, Any]:
    """The constructor's keyword arguments for ``cfg`` (fields the run fills in are taken from ``ctx``)."""
    kwargs = {}
    for field in spec.fields:
        value = getattr(cfg, field["name"])
        if field.get("required") and value is None:
            value = _from_run(spec, field["name"], ctx)
        kwargs[field["name"]] = _convert(field, value)
    return kwargs


def _max_steps(ctx: optiplug.BuildContext | None) -> int | None:
    steps = getattr(getattr(ctx, "args", None), "max_steps", None)
    return int(steps) if steps is not None and int(steps) > 0 else None


def _from_run(spec: Spec, name: str, ctx: optiplug.BuildContext | None) -> Any:
    if name in FROM_RUN and _max_steps(ctx) is not None:
        return _max_steps(ctx)
    hint = " or training.max_steps" if name in FROM_RUN else ""
    raise optiplug.ConfigError(
        f"{spec.name}: pytorch-optimizer's {spec.source} needs {name}: set optimizer.{name}{hint}"
    )


def check(ctx: optiplug.BuildContext, cfg: Any) -> None:
    """Refuse, before the first step, what the optimizer cannot train (each with what to change)."""
    spec = specs()[cfg.name]
    if spec.takes == "muon" and getattr(cfg, "param_groups", None):
        raise optiplug.ConfigError(
            f"{spec.name}: the Muon family takes pytorch-optimizer's own two groups (Muon on hidden matrices, AdamW "
            "on the rest, each with its lr and weight decay fields): remove optimizer.param_groups"
        )
    for field in spec.fields:
        if field.get("required") and getattr(cfg, field["name"]) is None:
            _from_run(spec, field["name"], ctx)
    if spec.source in BFLOAT16_NAN:
        import torch

        if any(p.dtype == torch.bfloat16 for _, p in ctx.named_parameters()):
            raise optiplug.ConfigError(f"{spec.name}: {BFLOAT16_NAN[spec.source]}")
    if spec.source == "spectralsphere":
        flat = [name for name, p in ctx.named_parameters() if p.ndim != 2]
        if flat:
            raise optiplug.ConfigError(
                f"{spec.name}: SpectralSphere trains 2-D weight matrices only, and {len(flat)} trainable parameters "
                f"are not 2-D ({', '.join(flat[:3])}{', ...' if len(flat) > 3 else ''}): train LoRA adapters "
                "(finetuning.type: lora) or freeze the others (finetuning.type: freeze)"
            )


def muon_groups(named: Sequence[tuple[str, Any, str]]) -> tuple[list[Any], list[Any]]:
    """pytorch-optimizer's Muon split of ``(name, parameter, module type)``: (Muon's, AdamW's).

    The rule of ``prepare_muon_parameters``: weights of at least two dimensions in Linear, Conv1d,
    Conv2d and LSTM modules whose name has no ``head``; everything else (embeddings, norms, biases,
    the output head) goes to the AdamW groups.
    """
    muon: list[Any] = []
    adamw: list[Any] = []
    for name, param, module_type in named:
        hidden = module_type in MUON_MODULES and param.ndim >= 2 and "head" not in name
        (muon if hidden else adamw).append(param)
    return muon, adamw


def _muon_param_groups(named: Sequence[tuple[str, Any, str]], kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    muon, adamw = muon_groups(named)
    groups = [
        {"params": muon, "lr": kwargs["lr"], "weight_decay": kwargs["weight_decay"], "use_muon": True},
        {"params": adamw, "lr": kwargs["adamw_lr"], "weight_decay": kwargs["adamw_wd"], "use_muon": False},
    ]
    return [group for group in groups if group["params"]]


def _module_types(model: Any) -> dict[str, str]:
    """``{parameter name: owning module's type}``, a subclass of a Muon module type named as its base (isinstance)."""
    from torch import nn

    bases = tuple(getattr(nn, name) for name in MUON_MODULES)
    owners = {}
    for module_name, module in model.named_modules():
        kind = next((base.__name__ for base in bases if isinstance(module, base)), type(module).__name__)
        for param_name, _ in module.named_parameters(recurse=False):
            owners[f"{module_name}.{param_name}" if module_name else param_name] = kind
    return owners


def _finish(optimizer: Any) -> Any:
    for group in optimizer.param_groups:
        if group.get("lr") is None:
            # A2Grad has no learning rate (its step size is its own); schedulers need a number to scale.
            group["lr"] = 1.0
    return optimizer


def build(ctx: optiplug.BuildContext, cfg: Any) -> Any:
    """The pytorch-optimizer optimizer ``cfg`` names, on the model's trainable parameters."""
    from optiplug_pytorch_optimizer.sharding import FOREACH_NOT_ON_DTENSOR, step_only_groups_with_parameters

    spec = specs()[cfg.name]
    kwargs = kwargs_of(spec, cfg, ctx)
    if ctx.distributed == "fsdp" and spec.source in FOREACH_NOT_ON_DTENSOR and kwargs.get("foreach") is None:
        kwargs["foreach"] = False  # its batched step calls an operator DTensor does not support
    cls = constructor(spec)
    if spec.takes == "muon":
        owners = _module_types(ctx.model)
        named = [(name, p, owners.get(name, "")) for name, p in ctx.named_parameters()]
        optimizer = _finish(cls(_muon_param_groups(named, kwargs), **kwargs))
    else:
        optimizer = _finish(cls(ctx.param_groups(kwargs.get("weight_decay", 0.0)), **kwargs))
    if ctx.distributed == "deepspeed":
        step_only_groups_with_parameters(optimizer)  # ZeRO-3 steps it once per group, the others empty
    return optimizer


_DTYPES = {8: "float64", 4: "float32", 2: "bfloat16", 1: "uint8"}
# Optimizers whose step cannot run on meta and whose source was read for the stand-in measurement: no state
# size depends on a parameter's size beyond the stand-ins' (no size threshold above 64), nor on values.
STAND_IN_REVIEWED = frozenset(
    {
        "adagc", "adamp", "avagrad", "dadaptadagrad", "dadaptadam", "dadaptadan", "dadaptlion", "dadaptsgd",
        "prodigy", "ranger21", "sgdp", "sgdsai", "spam", "stablespam",
    }
)  # fmt: skip
# Stand-in sizes: each dimension is cut to these (two sizes, so a state tensor's dependence on the size shows).
_STAND_INS = (67, 71)


class Unknown(optiplug.OptiplugError):
    """The state size cannot be known without training (never a guess)."""


def _optimizer_on(
    spec: Spec, cfg: Any, shapes: Sequence[optiplug.ParamShape], device: str, seed: int = 0
) -> tuple[Any, list[Any]]:
    """The optimizer on fresh parameters of ``shapes`` (with random gradients) on ``device``."""
    import torch

    kwargs = kwargs_of(spec, cfg.model_copy(update=_run_free(spec, cfg)))
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        dtype = getattr(torch, _DTYPES[shape.itemsize])
        if device == "meta":
            param = torch.nn.Parameter(torch.empty(shape.shape, dtype=dtype, device="meta"))
            param.grad = torch.empty_like(param)
        else:
            param = torch.nn.Parameter(torch.randn(shape.shape, generator=generator).to(dtype))
            param.grad = torch.randn(shape.shape, generator=generator).to(dtype)
        params.append(param)
    if spec.takes == "muon":
        unsure = sorted({s.module_type for s in shapes if _maybe_muon_subclass(s.module_type)})
        if unsure:
            raise Unknown(f"{spec.name}: cannot tell from the module types {unsure} which weights Muon takes")
        named = [(s.name, p, s.module_type) for s, p in zip(shapes, params)]
        optimizer = constructor(spec)(_muon_param_groups(named, kwargs), **kwargs)
    else:
        decay = [p for s, p in zip(shapes, params) if _decays(s)]
        no_decay = [p for s, p in zip(shapes, params) if not _decays(s)]
        weight_decay = kwargs.get("weight_decay", 0.0)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = constructor(spec)([g for g in groups if g["params"]], **kwargs)
    return _finish(optimizer), params


def _steps(spec: Spec, cfg: Any) -> int:
    return 3 + (int(getattr(cfg, GROWS_FOR[spec.source])) if spec.source in GROWS_FOR else 0)


def _run(spec: Spec, optimizer: Any, steps: int, measure: Any) -> list[Any]:
    import torch

    results = []
    with torch.no_grad():
        for _ in range(steps):
            optimizer.step()
            results.append(measure(optimizer))
    return results


def meta_state_bytes(shapes: Sequence[optiplug.ParamShape], cfg: Any) -> int:
    """The state measured by stepping the real optimizer on ``meta`` tensors (raises :class:`Unknown`)."""
    spec = specs()[cfg.name]
    _refuse_group_options(spec, cfg)
    optimizer, _ = _optimizer_on(spec, cfg, shapes, "meta")
    try:
        sizes = _run(spec, optimizer, _steps(spec, cfg), optiplug.optimizer_state_bytes)
    except Exception as error:  # any failure on meta: its step reads values; never a guess
        raise Unknown(f"{spec.name}: its step reads tensor values ({type(error).__name__} on meta)") from None
    if sizes[-1] != sizes[-2]:
        raise Unknown(f"{spec.name}: its state still grows after {len(sizes)} steps")
    return max(sizes)


def _leaves(obj: Any, path: str = "") -> list[tuple[str, Any]]:
    import torch

    if isinstance(obj, torch.Tensor):
        return [(path, obj)]
    if isinstance(obj, dict):
        return [leaf for key, value in obj.items() for leaf in _leaves(value, f"{path}/{key}")]
    if isinstance(obj, (list, tuple)):
        return [leaf for i, value in enumerate(obj) for leaf in _leaves(value, f"{path}/{i}")]
    return []


def _state_layout(
    spec: Spec, cfg: Any, shapes: Sequence[optiplug.ParamShape], size: int, seed: int = 0
) -> list[dict[str, Any]]:
    """Per parameter, ``{state path: (shape, element size)}`` after stepping stand-ins cut to ``size``."""
    cut = [optiplug.ParamShape(s.name, tuple(min(d, size) for d in s.shape), s.itemsize, s.module_type) for s in shapes]
    optimizer, params = _optimizer_on(spec, cfg, cut, "cpu", seed)
    try:
        _run(spec, optimizer, _steps(spec, cfg), lambda _: None)
    except Exception as error:  # a stand-in it cannot step (a shape it refuses): unknown, not a crash
        raise Unknown(f"{spec.name}: its step fails on the stand-ins ({type(error).__name__})") from None
    state = optimizer.state_dict()["state"]
    # state_dict numbers the parameters in group order; map each back to its place in ``shapes``
    ordered = [id(p) for group in optimizer.param_groups for p in group["params"]]
    index_of = {ordered.index(id(p)): position for position, p in enumerate(params)}
    # keys that are no parameter's (SPAM keeps its step counters in the state) hold plain values, or the total
    # check below fails
    by_position = {index_of[index]: value for index, value in state.items() if index in index_of}
    layouts = []
    total = 0
    for position in range(len(params)):
        leaves = _leaves(by_position.get(position, {}))
        layouts.append({path: (tuple(t.shape), t.element_size()) for path, t in leaves})
        total += sum(t.numel() * t.element_size() for _, t in leaves)
    if total != optiplug.optimizer_state_bytes(optimizer):
        raise Unknown(f"{spec.name}: its state tensors share storage")
    return layouts


def stand_in_state_bytes(shapes: Sequence[optiplug.ParamShape], cfg: Any) -> int:
    """The state from real steps on small CPU stand-ins (each dimension cut to 67, then to 71), scaled per element.

    Exact when every state tensor either has as many elements as its parameter at both stand-in sizes
    (scaled to the full parameter) or a shape that does not change with the parameter's size (taken as
    it is), and the layout does not change with the values (checked with a second seed); anything else
    (factored or low-rank statistics) raises :class:`Unknown`.
    """
    spec = specs()[cfg.name]
    _refuse_group_options(spec, cfg)
    if spec.source not in STAND_IN_REVIEWED:
        raise Unknown(f"{spec.name}: not reviewed for stand-in measurement")
    first, second = (_state_layout(spec, cfg, shapes, size) for size in _STAND_INS)
    if _state_layout(spec, cfg, shapes, _STAND_INS[0], seed=1) != first:
        raise Unknown(f"{spec.name}: its state's size depends on the values of the weights and gradients")
    total = 0
    for shape, a, b in zip(shapes, first, second):
        if a.keys() != b.keys():
            raise Unknown(f"{spec.name}: its state's layout depends on the parameters' sizes")
        cuts = [tuple(min(d, size) for d in shape.shape) for size in _STAND_INS]
        for path, (shape_a, itemsize) in a.items():
            shape_b = b[path][0]
            if math.prod(shape_a) == math.prod(cuts[0]) and math.prod(shape_b) == math.prod(cuts[1]):
                total += math.prod(shape.shape) * itemsize
            elif shape_a == shape_b:
                total += math.prod(shape_a) * itemsize
            else:
                raise Unknown(f"{spec.name}: its state {path.strip('/')} has a shape other than its parameter's")
    return total


def measured_state_bytes(shapes: Sequence[optiplug.ParamShape], cfg: Any) -> int:
    """The optimizer state for ``shapes``, measured without allocating it.

    First by stepping the real optimizer on ``meta`` tensors (shapes and dtypes of every state tensor
    come out as on a real device; nothing is allocated); when its step reads tensor values (not
    possible on ``meta``), by real steps on small stand-ins scaled per element
    (:func:`stand_in_state_bytes`). The state is the bytes of the tensors in ``state_dict()["state"]``,
    as :func:`optiplug.optimizer_state_bytes` counts them, the largest over the first steps.
    2-byte parameters are taken as bfloat16 (float16 has the same size).

    Raises:
        Unknown: neither way gives an exact number; never a guess.
    """
    try:
        return meta_state_bytes(shapes, cfg)
    except Unknown:
        return stand_in_state_bytes(shapes, cfg)


_NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def _decays(shape: optiplug.ParamShape) -> bool:
    """transformers' weight-decay rule (as BuildContext.param_groups applies it) from a name and module type."""
    return shape.module_type != "LayerNorm" and not _NO_DECAY.search(shape.name.lower())


def _refuse_group_options(spec: Spec, cfg: Any) -> None:
    """Per-group optimizer options (``optimizer.param_groups`` extras such as ``momentum``) may change the state."""
    extras = sorted({key for rule in getattr(cfg, "param_groups", ()) for key in (rule.model_extra or {})})
    if extras:
        raise Unknown(f"{spec.name}: per-group options {extras} in optimizer.param_groups are not measured")


def _maybe_muon_subclass(module_type: str) -> bool:
    """A module type that may subclass Linear/Conv/LSTM (which Muon's split decides by isinstance)."""
    return module_type not in MUON_MODULES and any(k in module_type for k in ("Linear", "Conv", "LSTM"))


def _run_free(spec: Spec, cfg: Any) -> dict[str, Any]:
    """Stand-ins for fields the run fills in (they do not change the state's size)."""
    return {f["name"]: 1000 for f in spec.fields if f.get("required") and getattr(cfg, f["name"]) is None}
