"""Text -> token blocks for causal language modelling.

``data.path`` names the embedded corpus (``"embedded"``), local ``.txt`` files (one document
each), ``.jsonl`` files (one JSON record per line) or ``.json`` files (an array of records),
or directories holding such files (searched recursively, hidden files skipped). Documents are
tokenized, joined with the tokenizer's end-of-sequence token between them, and cut into
blocks of ``data.block_size`` tokens; the last partial block is dropped. Labels are the
input ids (the model shifts them).

Evaluation text comes from ``data.eval_path`` (files in the same formats, none of them a training
file) or from ``data.eval_ratio``: the corpus's token stream (after ``data.max_blocks`` bounds it)
is split once, its last ``eval_ratio`` share held out, before either side is cut into blocks, so
no evaluation token is ever trained on. (As in nanoGPT's train/val split, a document that spans
the split point gives its beginning to training and its end to evaluation.)

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
    "check_evaluation_data",
    "load_dataset",
    "load_datasets",
    "read_documents",
    "resolve_paths",
    "tokenize_blocks",
]

EXTENSIONS = (".txt", ".jsonl", ".json")
_BATCH = 256  # documents tokenized per call


def assets_dir() -> Path:
    """The directory of the embedded assets (corpus, tokenizer, model config)."""
    return Path(__file__).resolve().parent.parent / "assets"


def resolve_paths(path: str | Sequence[str], field: str = "data.path") -> list[Path]:
    """The files ``data.path`` (or the ``field`` given) names, in order, with directories expanded (sorted, recursive).

    Raises:
        ConfigError: a path does not exist, has an unsupported extension, or is a directory
            without any supported file.
    """
    paths = [path] if isinstance(path, str) else list(path)
    if not paths:
        raise ConfigError(f"{field}: no files given; use 'embedded' or local .txt, .jsonl or .json files")
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
                raise ConfigError(f"{field}: directory {item!r} has no .txt, .jsonl or .json files")
            files.extend(found)
        elif p.is_file():
            if p.suffix.lower() not in EXTENSIONS:
                raise ConfigError(
                    f"{field}: {item!r} has the unsupported extension {p.suffix or '(none)'!r}; "
                    "use .txt, .jsonl or .json files or a directory of them"
                )
            files.append(p)
        else:
            raise ConfigError(f"{field}: {item!r} does not exist")
    return files


def _read_text(path: Path, source: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{source}: {str(path)!r} is not UTF-8 text (bad byte at offset {error.start})") from None
    except OSError as error:
        raise ConfigError(f"{source}: cannot read {str(path)!r}: {error.strerror or error}") from None


def _field_of(record: Any, field: str, where: str, source: str) -> str:
    if not isinstance(record, dict):
        raise ConfigError(
            f"{source}: {where} is a JSON {type(record).__name__}, expected an object with a {field!r} field"
        )
    if field not in record:
        fields = ", ".join(sorted(record)) or "none"
        raise ConfigError(f"{source}: {where} has no field {field!r} (its fields: {fields}); set data.text_field")
    value = record[field]
    if not isinstance(value, str):
        raise ConfigError(f"{source}: {where} field {field!r} is a {type(value).__name__}, expected a string")
    return value


def _documents_of(path: Path, text_field: str, source: str = "data.path") -> Iterator[str]:
    suffix = path.suffix.lower()
    text = _read_text(path, source)
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
                raise ConfigError(f"{source}: {where} is not valid JSON: {error.msg}") from None
            yield _field_of(record, text_field, where, source)
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{source}: {str(path)!r} is not valid JSON: {error.msg} (line {error.lineno})") from None
        if not isinstance(records, list):
            raise ConfigError(
                f"{source}: {str(path)!r} holds a JSON {type(records).__name__}; expected an array of records "
                f"with a {text_field!r} field (or use .jsonl, one record per line)"
            )
        for index, record in enumerate(records):
            yield _field_of(record, text_field, f"{str(path)!r} record {index}", source)


def read_documents(data: DataConfig, evaluation: bool = False) -> list[str]:
    """The non-empty documents of ``data.path`` (``data.eval_path`` with ``evaluation``), validated, in file order.

    Raises:
        ConfigError: a missing path, an unsupported extension, a file that is not UTF-8,
            a JSON line or record that is malformed or lacks ``data.text_field``.
    """
    field = "data.eval_path" if evaluation else "data.path"
    path = data.eval_path if evaluation else data.path
    if path is None:
        return []
    return [
        doc for file in resolve_paths(path, field) for doc in _documents_of(file, data.text_field, field) if doc.strip()
    ]


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


def _token_ids(documents: Sequence[str], tokenizer: Any, wanted: int | None) -> list[int]:
    """The documents' tokens joined with the end-of-sequence token; tokenizing stops once ``wanted`` are read."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for start in range(0, len(documents), _BATCH):
        batch = tokenizer(list(documents[start : start + _BATCH]), add_special_tokens=False, verbose=False)
        for doc in batch["input_ids"]:
            if ids and eos is not None:
                ids.append(eos)
            ids.extend(doc)
        if wanted is not None and len(ids) >= wanted:
            break
    return ids


def _blocks(ids: Sequence[int], block_size: int, max_blocks: int | None, what: str, total: int) -> TokenBlocks:
    count = len(ids) // block_size
    if count == 0:
        raise ConfigError(
            f"data: {what} has {len(ids)} tokens, fewer than one block of data.block_size={block_size}; "
            "add more text or lower data.block_size"
        )
    if max_blocks is not None:
        count = min(count, max_blocks)
    blocks = torch.tensor(list(ids[: count * block_size]), dtype=torch.long).view(count, block_size)
    return TokenBlocks(blocks, total_tokens=total)


def tokenize_blocks(
    documents: Sequence[str], tokenizer: Any, block_size: int, max_blocks: int | None = None, what: str = "the corpus"
) -> TokenBlocks:
    """Tokenize ``documents``, join them with the end-of-sequence token and cut blocks of ``block_size``.

    Tokenizing stops once ``max_blocks`` blocks are filled.

    Raises:
        ConfigError: the corpus has fewer tokens than one block.
    """
    wanted = None if max_blocks is None else max_blocks * block_size
    ids = _token_ids(documents, tokenizer, wanted)
    return _blocks(ids, block_size, max_blocks, what, len(ids))


def held_out_tokens(tokens: int, ratio: float) -> int:
    """How many of ``tokens`` (the end of the stream) ``data.eval_ratio`` holds out for evaluation."""
    return round(tokens * ratio)


def _too_few_held_out(data: DataConfig, tokens: int, held: int, read: str) -> ConfigError:
    more = " or data.max_blocks" if data.max_blocks is not None else ""
    return ConfigError(
        f"data.eval_ratio={data.eval_ratio:g} holds out {held} of the {tokens} tokens {read}, fewer than one "
        f"evaluation block of data.block_size={data.block_size}: raise data.eval_ratio{more}, or give held-out "
        "text in data.eval_path"
    )


def load_dataset(data: DataConfig, tokenizer: Any) -> TokenBlocks:
    """Read, validate and tokenize ``data`` into a :class:`TokenBlocks` dataset (the training blocks).

    Args:
        data: the run config's data section.
        tokenizer: a ``transformers`` tokenizer (its ``eos_token_id`` separates documents).

    Raises:
        ConfigError: see :func:`read_documents` and :func:`tokenize_blocks`.
    """
    return load_datasets(data, tokenizer)[0]


def load_datasets(data: DataConfig, tokenizer: Any) -> tuple[TokenBlocks, TokenBlocks | None]:
    """The training blocks and the evaluation blocks (None without ``data.eval_path`` or ``data.eval_ratio``).

    Raises:
        ConfigError: see :func:`read_documents` and :func:`tokenize_blocks`; also an ``eval_ratio`` that
            leaves no evaluation block, and evaluation files that are training files.
    """
    check_evaluation_data(data)
    documents = read_documents(data)
    if data.eval_ratio is None:
        train = tokenize_blocks(documents, tokenizer, data.block_size, data.max_blocks)
        if data.eval_path is None:
            return train, None
        evaluation = tokenize_blocks(
            read_documents(data, evaluation=True), tokenizer, data.block_size, data.eval_max_blocks, "data.eval_path"
        )
        return train, evaluation
    wanted = None if data.max_blocks is None else data.max_blocks * data.block_size
    ids = _token_ids(documents, tokenizer, wanted)[:wanted]
    held = held_out_tokens(len(ids), data.eval_ratio)
    if held < data.block_size:
        read = "read" if data.max_blocks is None else f"read (data.max_blocks={data.max_blocks})"
        raise _too_few_held_out(data, len(ids), held, read)
    split = len(ids) - held
    train = _blocks(ids[:split], data.block_size, None, "the corpus without its evaluation share", split)
    evaluation = _blocks(ids[split:], data.block_size, data.eval_max_blocks, "the evaluation share", held)
    return train, evaluation


def check_evaluation_data(data: DataConfig) -> None:
    """What can be checked of the evaluation data without reading it (``optiplug validate``).

    The files of ``data.eval_path`` exist and have supported formats, none is also a training file;
    an ``eval_ratio`` that ``data.max_blocks`` makes too small to hold one block is refused.

    Raises:
        ConfigError: with what to change.
    """
    if data.eval_path is not None:
        training = {path.resolve() for path in resolve_paths(data.path)}
        for path in resolve_paths(data.eval_path, "data.eval_path"):
            if path.resolve() in training:
                raise ConfigError(
                    f"data.eval_path: {str(path)!r} is also training data (data.path): evaluating on trained text "
                    "measures memorisation; give held-out files, or hold out a share with data.eval_ratio"
                )
    if data.eval_ratio is not None and data.max_blocks is not None:
        tokens = data.max_blocks * data.block_size
        held = held_out_tokens(tokens, data.eval_ratio)
        if held < data.block_size:
            raise _too_few_held_out(data, tokens, held, f"data.max_blocks={data.max_blocks} reads at most")
