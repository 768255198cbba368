"""Which parameters form each block: inference from parameter names, and validation of explicit blocks.

Pure Python on parameter names, so ``check``, ``build`` and ``state_bytes`` agree and none
of them needs torch. A parameter belongs to a block when one of the block's strings occurs
in its name, which is how ``badam`` matches its ``block_prefix_list``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import optiplug

if TYPE_CHECKING:
    from optiplug_badam.config import BAdamConfig

# The first numbered component of a name is its layer: ``model.layers.3.``, ``transformer.h.3.``,
# ``base_model.model.model.layers.3.`` (peft). On Llama-style names this gives exactly badam's
# ``.*layers.[^.]*\.`` prefixes, and it also finds layers that are not called ``layers``.
_LAYER = re.compile(r"^((?:.*?\.)?\d+\.)")
_EMBED = re.compile(r".*embed[^.]*\.")  # badam's embedding pattern

_SHOWN = 8


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _SHOWN else "")


def in_block(name: str, prefixes: Sequence[str]) -> bool:
    """Whether parameter ``name`` belongs to the block given by ``prefixes`` (badam's substring rule)."""
    return any(prefix in name for prefix in prefixes)


def infer_blocks(names: Sequence[str], include_embedding: bool, include_lm_head: bool) -> list[list[str]]:
    """Blocks in the order their first parameter appears: one per numbered layer, the embedding
    (if included) and the remaining parameters (output head, final norm; if included) last.

    Unlike badam's inference, ``include_lm_head`` never brings in the embedding.
    """
    blocks: dict[str, list[str]] = {}
    others: list[str] = []
    for name in names:
        layer = _LAYER.match(name)
        if layer:
            blocks.setdefault(layer.group(1), [layer.group(1)])
            continue
        embed = _EMBED.match(name)
        if embed:
            if include_embedding:
                blocks.setdefault(embed.group(0), [embed.group(0)])
            continue
        others.append(name)
    result = list(blocks.values())
    if include_lm_head and others:
        result.append(others)
    return result


@dataclass(frozen=True)
class BlockPlan:
    """The blocks a layer-mode run trains, and the trainable parameters none of them reaches."""

    blocks: list[list[str]]
    never_trained: list[str]

    def members(self, index: int, names: Sequence[str], active_modules: Sequence[str] = ()) -> list[str]:
        """The names trained while block ``index`` is active."""
        prefixes = [*self.blocks[index], *active_modules]
        return [name for name in names if in_block(name, prefixes)]


def plan_blocks(names: Sequence[str], cfg: BAdamConfig) -> BlockPlan:
    """Resolve ``cfg``'s blocks against the trainable parameter ``names`` (layer mode).

    Raises:
        ConfigError: no block could be formed, a block or an active module matches no
            parameter, or ``start_block`` is out of range.
    """
    if cfg.blocks is not None:
        blocks = [list(block) for block in cfg.blocks]
    else:
        blocks = infer_blocks(names, cfg.include_embedding, cfg.include_lm_head)
        if not blocks:
            raise optiplug.ConfigError(
                f"badam: no numbered layers found in the trainable parameter names ({_listing(list(names))}): "
                "list the blocks in optimizer.blocks"
            )
    for index, block in enumerate(blocks):
        if not any(in_block(name, block) for name in names):
            raise optiplug.ConfigError(
                f"badam: optimizer.blocks[{index}] {block} matches no trainable parameter; names look like: "
                f"{_listing(list(names))}"
            )
    for prefix in cfg.active_modules:
        if not any(prefix in name for name in names):
            raise optiplug.ConfigError(
                f"badam: optimizer.active_modules entry {prefix!r} matches no trainable parameter; names look like: "
                f"{_listing(list(names))}"
            )
    if cfg.start_block is not None and cfg.start_block >= len(blocks):
        raise optiplug.ConfigError(
            f"badam: optimizer.start_block is {cfg.start_block} but there are {len(blocks)} blocks "
            f"(0 to {len(blocks) - 1})"
        )
    reached = [*(p for block in blocks for p in block), *cfg.active_modules]
    never = [name for name in names if not in_block(name, reached)]
    return BlockPlan(blocks, never)


def ratio_frozen(names: Sequence[str], cfg: BAdamConfig) -> list[str]:
    """Parameters ratio mode freezes: badam's first ``embed`` and first ``lm_head`` parameter, unless included."""
    frozen = []
    if not cfg.include_embedding:
        frozen += [name for name in names if "embed" in name][:1]
    if not cfg.include_lm_head:
        frozen += [name for name in names if "lm_head" in name][:1]
    return frozen


def never_trained_message(names: Sequence[str]) -> str:
    """The warning for trainable parameters the configuration never updates."""
    return (
        f"badam: {len(names)} trainable parameter(s) are never updated with these settings: {_listing(list(names))} "
        "(set include_embedding / include_lm_head, or add them to blocks or active_modules, to train them)"
    )
