"""optiplug.app.data: documents from files, token blocks, and the errors a user can cause."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from optiplug import ConfigError
from optiplug.app import DataConfig
from optiplug.app.data import TokenBlocks, assets_dir, load_dataset, read_documents, resolve_paths, tokenize_blocks


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets_dir() / "tokenizer")


def _data(path, **fields) -> DataConfig:
    return DataConfig(path=path if isinstance(path, list) else str(path), **fields)


def _error(data: DataConfig) -> str:
    with pytest.raises(ConfigError) as info:
        read_documents(data)
    return str(info.value)


# ---- the embedded assets --------------------------------------------------------------------


def test_embedded_assets_load_offline(tokenizer):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(assets_dir() / "model")
    assert config.model_type == "llama"
    assert config.vocab_size == len(tokenizer) == 2048
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<s>", "</s>", "<pad>", "<unk>",
    )  # fmt: skip
    assert config.eos_token_id == tokenizer.eos_token_id
    text = "The assert statement is a convenient way to insert debugging assertions."
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_embedded_corpus_to_blocks(tokenizer):
    (corpus,) = read_documents(DataConfig())
    assert 200_000 < len(corpus) < 1_000_000
    assert "*****" not in corpus and ">>>" not in corpus
    dataset = load_dataset(DataConfig(block_size=64, max_blocks=10), tokenizer)
    assert isinstance(dataset, torch.utils.data.Dataset)
    assert len(dataset) == 10 and dataset.block_size == 64
    item = dataset[3]
    assert item["input_ids"].dtype == torch.long and item["input_ids"].shape == (64,)
    assert torch.equal(item["input_ids"], item["labels"])
    full = load_dataset(DataConfig(block_size=64), tokenizer)
    assert len(full) == full.total_tokens // 64 > 10
    assert torch.equal(full.blocks[:10], dataset.blocks)


# ---- local files ----------------------------------------------------------------------------


def test_documents_are_joined_with_eos(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.txt").write_text("second document")
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    expected = [*ids("first document"), tokenizer.eos_token_id, *ids("second document")]
    dataset = load_dataset(_data(tmp_path, block_size=len(expected)), tokenizer)
    assert dataset.blocks.tolist() == [expected]
    assert dataset.total_tokens == len(expected)


def test_jsonl_json_and_directories(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b.jsonl").write_text('{"body": "one", "id": 1}\n\n{"body": "two"}\n')
    (tmp_path / "sub" / "c.json").write_text(json.dumps([{"body": "three"}, {"body": "  "}]))
    (tmp_path / "a.txt").write_text("zero")
    (tmp_path / "notes.md").write_text("ignored in directories")
    (tmp_path / ".hidden" / "d.txt").write_text("hidden")
    data = _data(tmp_path, text_field="body")
    assert [p.name for p in resolve_paths(data.path)] == ["a.txt", "b.jsonl", "c.json"]
    assert read_documents(data) == ["zero", "one", "two", "three"]
    both = _data([str(tmp_path / "a.txt"), "embedded"])
    documents = read_documents(both)
    assert documents[0] == "zero" and len(documents) == 2


def test_max_blocks_stops_tokenizing_early(tokenizer):
    documents = ["the words of a document"] * 5000
    per_document = len(tokenizer(documents[0], add_special_tokens=False)["input_ids"]) + 1
    dataset = tokenize_blocks(documents, tokenizer, block_size=16, max_blocks=2)
    assert len(dataset) == 2
    assert dataset.total_tokens == 256 * per_document - 1  # the first batch of 256 documents, not all 5000


# ---- errors ---------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    missing = str(tmp_path / "nope.txt")
    assert _error(_data(missing)) == f"data.path: {missing!r} does not exist"


def test_unsupported_extension(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("a,b\n")
    assert _error(_data(path)) == (
        f"data.path: {str(path)!r} has the unsupported extension '.csv'; "
        "use .txt, .jsonl or .json files or a directory of them"
    )


def test_directory_without_text_files(tmp_path):
    (tmp_path / "notes.md").write_text("x")
    assert _error(_data(tmp_path)) == f"data.path: directory {str(tmp_path)!r} has no .txt, .jsonl or .json files"


def test_jsonl_line_that_is_not_json(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n{"text": oops}\n')
    assert _error(_data(path)) == f"data.path: {str(path)!r} line 2 is not valid JSON: Expecting value"


def test_jsonl_line_without_the_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n\n{"content": "x", "id": 3}\n')
    assert _error(_data(path)) == (
        f"data.path: {str(path)!r} line 3 has no field 'text' (its fields: content, id); set data.text_field"
    )


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('["text"]\n')
    assert _error(_data(path)) == (
        f"data.path: {str(path)!r} line 1 is a JSON list, expected an object with a 'text' field"
    )


def test_json_that_is_not_an_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"text": "one record"}')
    assert _error(_data(path)) == (
        f"data.path: {str(path)!r} holds a JSON dict; expected an array of records with a 'text' field "
        "(or use .jsonl, one record per line)"
    )


def test_json_record_with_a_non_string_field(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"text": "ok"}, {"text": 5}]')
    assert _error(_data(path)) == f"data.path: {str(path)!r} record 1 field 'text' is a int, expected a string"


def test_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "d.txt"
    path.write_bytes(b"caf\xe9")
    assert _error(_data(path)) == f"data.path: {str(path)!r} is not UTF-8 text (bad byte at offset 3)"


def test_corpus_smaller_than_one_block(tmp_path, tokenizer):
    path = tmp_path / "d.txt"
    path.write_text("just a few words")
    count = len(tokenizer("just a few words", add_special_tokens=False)["input_ids"])
    with pytest.raises(ConfigError) as info:
        load_dataset(_data(path, block_size=128), tokenizer)
    assert str(info.value) == (
        f"data: the corpus has {count} tokens, fewer than one block of data.block_size=128; "
        "add more text or lower data.block_size"
    )


def test_token_blocks_is_a_plain_dataset():
    blocks = TokenBlocks(torch.arange(12).view(3, 4), total_tokens=13)
    assert len(blocks) == 3 and blocks.block_size == 4
    assert blocks[2]["labels"].tolist() == [8, 9, 10, 11]
    assert Path(assets_dir(), "corpus.txt").is_file()
