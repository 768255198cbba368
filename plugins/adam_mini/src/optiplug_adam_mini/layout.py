"""Adam-mini's partition of a model, without torch: the head layout from the model's config, the block kind
of each parameter by adam-mini 1.1's name rules, and the state those blocks hold.

adam-mini gives one second-moment value (one learning rate) per block instead of one per weight:

* ``heads``: query and key projections, one block per attention head (``head_dim x hidden`` weights);
* ``rows``: embedding, output head, value, attention output and MLP weights, one block per row
  (per token of the embedding and head, per output neuron of the others);
* ``one``: everything else (norms), one block per tensor;
* ``adam``: biases, plain Adam (one value per weight).

The rules below are adam-mini's own (``Adam_mini.__init__`` and the branch order of ``Adam_mini.step``);
``tests/test_adam_mini.py`` checks them against the installed package.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import optiplug

__all__ = ["BlockKind", "Layout", "block_kind", "check_partition", "layout_of", "second_moments", "state_bytes_for"]

BlockKind = Literal["adam", "heads", "rows", "one"]

# adam-mini 1.1.1's name fragments, matched as substrings of the lower-cased parameter name.
EMBD_NAMES = frozenset({"embed", "embd", "wte"})
OUTPUT_NAMES = frozenset({"lm_head", "output", "final_layer"})
WQK_NAMES = frozenset({"k_proj", "q_proj", "wq", "wk", "query", "key"})
WV_NAMES = frozenset({"v_proj", "wv", "value"})
ATTN_PROJ_NAMES = frozenset({"o_proj", "wo", "attn.proj"})
MLP_NAMES = frozenset({"feed_forward", "linear", "mlp"})
ADAM_BLOCK_NAMES = frozenset({"bias"})
ROW_NAMES = EMBD_NAMES | OUTPUT_NAMES | WV_NAMES | ATTN_PROJ_NAMES | MLP_NAMES


def block_kind(name: str) -> BlockKind:
    """How adam-mini partitions the parameter ``name`` (its ``step``'s branch order: bias, query/key, rows, rest)."""
    lowered = name.lower()
    if any(part in lowered for part in ADAM_BLOCK_NAMES):
        return "adam"
    if any(part in lowered for part in WQK_NAMES):
        return "heads"
    if any(part in lowered for part in ROW_NAMES):
        return "rows"
    return "one"


@dataclass(frozen=True)
class Layout:
    """The attention layout adam-mini needs, as the model's config states it.

    Attributes:
        hidden: the hidden size (the row length of the query and key weights).
        heads: attention heads of the query projection.
        kv_heads: key/value heads (grouped-query attention), ``heads`` without grouping.
        head_dim: the size of one head; the config's ``head_dim`` where it has one, else ``hidden / heads``.
    """

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def head_numel(self) -> int:
        """Weights in one query/key head block: ``head_dim`` rows of ``hidden``."""
        return self.head_dim * self.hidden


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def layout_of(model: Any) -> Layout:
    """The head layout from ``model.config`` (its text config for multimodal models).

    Raises:
        optiplug.ConfigError: the model has no config, or the config lacks a usable hidden size or head count.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise optiplug.ConfigError(
            f"adam_mini: the model ({type(model).__name__}) has no transformers config to read the hidden size and "
            "attention heads from (hidden_size, num_attention_heads); Adam-mini partitions transformer models only: "
            "pick another optimizer"
        )
    if callable(getattr(config, "get_text_config", None)):
        config = config.get_text_config()
    hidden = _positive_int(getattr(config, "hidden_size", None))
    heads = _positive_int(getattr(config, "num_attention_heads", None))
    if hidden is None or heads is None:
        raise optiplug.ConfigError(
            f"adam_mini: the model's config ({type(config).__name__}) states no hidden_size and num_attention_heads "
            f"(got {getattr(config, 'hidden_size', None)!r} and {getattr(config, 'num_attention_heads', None)!r}), "
            "which Adam-mini needs to give query and key weights one learning rate per head: pick another optimizer"
        )
    kv_heads = _positive_int(getattr(config, "num_key_value_heads", None)) or heads
    if heads % kv_heads:
        raise optiplug.ConfigError(
            f"adam_mini: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads} in the "
            "model's config, so the key heads cannot be grouped: pick another optimizer"
        )
    head_dim = _positive_int(getattr(config, "head_dim", None))
    if head_dim is None:
        if hidden % heads:
            raise optiplug.ConfigError(
                f"adam_mini: hidden_size {hidden} is not a multiple of num_attention_heads {heads} and the model's "
                "config has no head_dim, so the size of a head is unknown: pick another optimizer"
            )
        head_dim = hidden // heads
    return Layout(hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim)


def check_partition(named_shapes: Iterable[tuple[str, Sequence[int]]], layout: Layout) -> None:
    """Refuse a model whose trainable parameters adam-mini would split wrongly or fail on at its first step.

    Raises:
        optiplug.ConfigError: no query/key weight, a query/key weight that is not whole heads of ``head_dim x
            hidden``, or a row-block weight that is not a matrix.
    """
    found_heads = False
    for name, shape in named_shapes:
        shape = tuple(shape)
        kind = block_kind(name)
        if kind == "heads":
            found_heads = True
            if len(shape) != 2 or shape[1] != layout.hidden or shape[0] % layout.head_dim:
                raise optiplug.ConfigError(
                    f"adam_mini: {name} {list(shape)} is a query/key weight by its name, but not whole attention "
                    f"heads of {layout.head_dim} rows x {layout.hidden} (head_dim and hidden_size from the model's "
                    "config), so Adam-mini cannot give it one learning rate per head: pick another optimizer"
                )
        elif kind == "rows" and len(shape) != 2:
            raise optiplug.ConfigError(
                f"adam_mini: {name} {list(shape)} gets one learning rate per row by its name, which Adam-mini "
                "computes for matrices only (it fails on this tensor at the first step): pick another optimizer"
            )
    if not found_heads:
        raise optiplug.ConfigError(
            "adam_mini: no trainable query/key projection found (Adam-mini matches names containing "
            f"{', '.join(sorted(WQK_NAMES))}), so it cannot give attention one learning rate per head; this "
            "architecture names or fuses them differently (one qkv matrix): pick another optimizer"
        )


def second_moments(name: str, shape: Sequence[int], layout: Layout) -> int:
    """Second-moment values adam-mini keeps for one parameter: one per block."""
    numel = 1
    for size in shape:
        numel *= size
    kind = block_kind(name)
    if kind == "adam":
        return numel
    if kind == "heads":
        return numel // layout.head_numel
    if kind == "rows":
        return int(shape[0])
    return 1


def state_bytes_for(shapes: Sequence[optiplug.ParamShape], layout: Layout) -> int:
    """Bytes of adam-mini's state after a step: a first moment per weight, one second moment per block.

    Both in the parameter's dtype (adam-mini allocates them with ``zeros_like``); its step counters are
    Python ints, not tensors, so no ``STEP_BYTES``.
    """
    first = optiplug.moment_bytes(shapes, per_element=1.0, scalars=0)
    second = sum(second_moments(s.name, s.shape, layout) * s.itemsize for s in shapes)
    return first + second
