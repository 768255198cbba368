"""Text -> token blocks for causal language modelling.

``data.path`` names the embedded corpus (``"embedded"``), local ``.txt`` files (one document
each), ``.jsonl`` files (one JSON record per line) or ``.json`` files (an array of records),
or directories holding such files (searched recursively, hidden files skipped). Documents are
tokenized, joined with the tokenizer's end-of-sequence token between them, and cut into
blocks of ``data.block_size`` tokens; the last partial block is dropped. Labels are the
input ids (the model shifts them).

Everything is read into memory: this is for small and medium corpora, not for streaming
terabytes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from optiplug.app.config import EMBEDDED, DataConfig
from optiplug.errors import ConfigError

__all__ = [
    "EXTENSIONS",
    "TokenBlocks",
    "assets_dir",
    "load_dataset",
    "read_documents",
    "resolve_paths",
    "tokenize_blocks",
]

EXTENSIONS = (".txt", ".jsonl", ".json")
_BATCH = 256  # documents tokenized per call


def assets_dir() -> Path:
    """The directory of the embedded assets (corpus, tokenizer, model config)."""
    return Path(__file__).resolve().parent.parent / "assets"


def resolve_paths(path: str | Sequence[str]) -> list[Path]:
    """The files ``data.path`` names, in order, with directories expanded (sorted, recursive).

    Raises:
        ConfigError: a path does not exist, has an unsupported extension, or is a directory
            without any supported file.
    """
    paths = [path] if isinstance(path, str) else list(path)
    if not paths:
        raise ConfigError("data.path: no files given; use 'embedded' or local .txt, .jsonl or .json files")
    files: list[Path] = []
    for item in paths:
        if item == EMBEDDED:
            files.append(assets_dir() / "corpus.txt")
            continue
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.is_file()
                and f.suffix.lower() in EXTENSIONS
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            if not found:
                raise ConfigError(f"data.path: directory {item!r} has no .txt, .jsonl or .json files")
            files.extend(found)
        elif p.is_file():
            if p.suffix.lower() not in EXTENSIONS:
                raise ConfigError(
                    f"data.path: {item!r} has the unsupported extension {p.suffix or '(none)'!r}; "
                    "use .txt, .jsonl or .json files or a directory of them"
                )
            files.append(p)
        else:
            raise ConfigError(f"data.path: {item!r} does not exist")
    return files


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"data.path: {str(path)!r} is not UTF-8 text (bad byte at offset {error.start})") from None
    except OSError as error:
        raise ConfigError(f"data.path: cannot read {str(path)!r}: {error.strerror or error}") from None


def _field_of(record: Any, field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise ConfigError(
            f"data.path: {where} is a JSON {type(record).__name__}, expected an object with a {field!r} field"
        )
    if field not in record:
        fields = ", ".join(sorted(record)) or "none"
        raise ConfigError(f"data.path: {where} has no field {field!r} (its fields: {fields}); set data.text_field")
    value = record[field]
    if not isinstance(value, str):
        raise ConfigError(f"data.path: {where} field {field!r} is a {type(value).__name__}, expected a string")
    return value


def _documents_of(path: Path, text_field: str) -> Iterator[str]:
    suffix = path.suffix.lower()
    text = _read_text(path)
    if suffix == ".txt":
        yield text
    elif suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{str(path)!r} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"data.path: {where} is not valid JSON: {error.msg}") from None
            yield _field_of(record, text_field, where)
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(
                f"data.path: {str(path)!r} is not valid JSON: {error.msg} (line {error.lineno})"
            ) from None
        if not isinstance(records, list):
            raise ConfigError(
                f"data.path: {str(path)!r} holds a JSON {type(records).__name__}; expected an array of records "
                f"with a {text_field!r} field (or use .jsonl, one record per line)"
            )
        for index, record in enumerate(records):
            yield _field_of(record, text_field, f"{str(path)!r} record {index}")


def read_documents(data: DataConfig) -> list[str]:
    """The non-empty documents of ``data.path``, validated, in file order.

    Raises:
        ConfigError: a missing path, an unsupported extension, a file that is not UTF-8,
            a JSON line or record that is malformed or lacks ``data.text_field``.
    """
    return [doc for path in resolve_paths(data.path) for doc in _documents_of(path, data.text_field) if doc.strip()]


class TokenBlocks(Dataset):
    """A map-style dataset of equal-length token blocks: ``{"input_ids": ..., "labels": ...}`` per item.

    Attributes:
        blocks: a ``LongTensor`` of shape ``(num_blocks, block_size)``.
        total_tokens: tokens in the corpus before it was cut into blocks.
    """

    def __init__(self, blocks: torch.Tensor, total_tokens: int):
        self.blocks = blocks
        self.total_tokens = total_tokens

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.blocks[index]
        return {"input_ids": row, "labels": row}

    @property
    def block_size(self) -> int:
        return self.blocks.shape[1]


def tokenize_blocks(
    documents: Sequence[str], tokenizer: Any, block_size: int, max_blocks: int | None = None
) -> TokenBlocks:
    """Tokenize ``documents``, join them with the end-of-sequence token and cut blocks of ``block_size``.

    Tokenizing stops once ``max_blocks`` blocks are filled.

    Raises:
        ConfigError: the corpus has fewer tokens than one block.
    """
    eos = tokenizer.eos_token_id
    wanted = None if max_blocks is None else max_blocks * block_size
    ids: list[int] = []
    for start in range(0, len(documents), _BATCH):
        batch = tokenizer(list(documents[start : start + _BATCH]), add_special_tokens=False, verbose=False)
        for doc in batch["input_ids"]:
            if ids and eos is not None:
                ids.append(eos)
            ids.extend(doc)
        if wanted is not None and len(ids) >= wanted:
            break
    count = len(ids) // block_size
    if count == 0:
        raise ConfigError(
            f"data: the corpus has {len(ids)} tokens, fewer than one block of data.block_size={block_size}; "
            "add more text or lower data.block_size"
        )
    if max_blocks is not None:
        count = min(count, max_blocks)
    blocks = torch.tensor(ids[: count * block_size], dtype=torch.long).view(count, block_size)
    return TokenBlocks(blocks, total_tokens=len(ids))


def load_dataset(data: DataConfig, tokenizer: Any) -> TokenBlocks:
    """Read, validate and tokenize ``data`` into a :class:`TokenBlocks` dataset.

    Args:
        data: the run config's data section.
        tokenizer: a ``transformers`` tokenizer (its ``eos_token_id`` separates documents).

    Raises:
        ConfigError: see :func:`read_documents` and :func:`tokenize_blocks`.
    """
    return tokenize_blocks(read_documents(data), tokenizer, data.block_size, data.max_blocks)
