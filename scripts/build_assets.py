"""Build the embedded default assets under ``src/optiplug/assets/``.

* ``corpus.txt``: the prose of Python's own help topics (``pydoc_data.topics``, PSF licence),
  with reST heading underlines dropped, code and grammar blocks left out and paragraphs
  reflowed onto one line each.
* ``tokenizer/``: a byte-level BPE tokenizer trained on that corpus, loadable offline with
  ``transformers.AutoTokenizer.from_pretrained``.
* ``model/config.json``: a tiny Llama-style config whose vocabulary is the tokenizer's.

Deterministic for a given Python version (the help topics ship with the interpreter) and
tokenizers version; rerun it to rebuild::

    python scripts/build_assets.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import textwrap
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "src" / "optiplug" / "assets"

VOCAB_SIZE = 2048
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
MAX_POSITIONS = 1024

MODEL = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "tie_word_embeddings": True,
}

UNDERLINE = re.compile(r"^\s*([*=\-~^#\"'`])\1{2,}\s*$")
CODE_MARKS = (">>>", "::=", "...:", "$ ")


def _is_prose(paragraph: str) -> bool:
    """An indented block is kept only when it reads like a sentence (not code, grammar or a table)."""
    text = " ".join(paragraph.split())
    if not text.endswith((".", ":")):
        return False
    words = text.split()
    wordy = sum(1 for w in words if re.fullmatch(r"[A-Za-z][a-z'’-]*[.,;:]?", w))
    return len(words) >= 4 and wordy / len(words) >= 0.6


def clean_topic(text: str) -> str:
    """One help topic as plain text: title first, then one paragraph per line."""
    lines = [line for line in text.splitlines() if not UNDERLINE.match(line)]
    paragraphs = []
    for block in re.split(r"\n\s*\n", "\n".join(lines)):
        if not block.strip():
            continue
        if any(mark in block for mark in CODE_MARKS):
            continue
        if block.startswith(" ") and not _is_prose(textwrap.dedent(block)):
            continue
        paragraphs.append(" ".join(block.split()))
    return "\n".join(paragraphs)


def build_corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(clean_topic(topics[key]) for key in sorted(topics)) + "\n"


def build_tokenizer(corpus_file: Path, out_dir: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[BOS, EOS, PAD, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(corpus_file)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=MAX_POSITIONS,
    )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    fast.save_pretrained(out_dir)
    # transformers 5 writes its own class name; the generic one also loads with transformers 4.x.
    config_file = out_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return len(fast)


def build_model_config(tokenizer_dir: Path, out_dir: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    config.to_json_file(out_dir / "config.json", use_diff=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ASSETS, help="assets directory (default: %(default)s)")
    out: Path = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)

    corpus_file = out / "corpus.txt"
    corpus_file.write_text(build_corpus(), encoding="utf-8")
    vocab = build_tokenizer(corpus_file, out / "tokenizer")
    build_model_config(out / "tokenizer", out / "model")

    for path in sorted(p for p in out.rglob("*") if p.is_file() and p.name != "README.md"):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        print(f"{path.relative_to(out)}  {path.stat().st_size:>8} bytes  sha256 {digest}")
    print(f"vocabulary: {vocab} tokens")


if __name__ == "__main__":
    main()
