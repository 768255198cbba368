"""Shared helpers of the benchmark scripts: the fixed model sizes, data, timing, results, peak RSS.

Every benchmark uses one of the model sizes below, so numbers from different scripts are
comparable. The vocabulary is deliberately small (2048) so that, as in a real 7B model, the
transformer blocks' linear layers hold almost all parameters (in Llama-2-7B the embedding and
head are 4% of the weights; here they are 7.7% (27M) and 3.6% (100M)), which is what GaLore and BAdam act on.

Each script writes ``benchmarks/results/<script-name>.json``::

    {"title": "...", "rows": [{...}, ...], "notes": "...", ...}

with :func:`write_results`; ``benchmarks/run_all.py`` turns those files into ``docs/benchmarks.md``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"


@dataclass(frozen=True)
class ModelSize:
    """A Llama-style model shape (untied embedding and head, as in Llama-2)."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int

    def parameters(self) -> int:
        """Exact parameter count: attention, MLP and norms per layer, plus embedding, head and final norm."""
        h, i = self.hidden, self.intermediate
        per_layer = 4 * h * h + 3 * h * i + 2 * h
        return self.layers * per_layer + 2 * self.vocab * h + h

    def describe(self) -> str:
        return (
            f"vocab {self.vocab}, hidden {self.hidden}, intermediate {self.intermediate}, "
            f"{self.layers} layers, {self.heads} heads"
        )


MODEL_SIZES: dict[str, ModelSize] = {
    "tiny": ModelSize(vocab=256, hidden=64, intermediate=128, layers=2, heads=4),
    "27M": ModelSize(vocab=2048, hidden=512, intermediate=1376, layers=8, heads=8),
    "100M": ModelSize(vocab=2048, hidden=768, intermediate=2048, layers=12, heads=12),
}
"""The fixed sizes used across benchmarks (``"100M"`` is 88.1M parameters: the name is its class)."""

SEQ_LEN = 128
"""Tokens per training example in the benchmarks unless a script says otherwise."""


def llama_config(size: str, **overrides: Any):
    """The ``LlamaConfig`` of a named size."""
    from transformers import LlamaConfig

    s = MODEL_SIZES[size]
    kwargs: dict[str, Any] = dict(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.heads,
        max_position_embeddings=max(1024, SEQ_LEN),
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def build_model(size: str, seed: int = 0, dtype: str = "float32", **overrides: Any):
    """A randomly initialised ``LlamaForCausalLM`` of a named size (deterministic for ``seed``)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(size, **overrides))
    return model.to(getattr(torch, dtype))


class TokenDataset:
    """``n`` fixed random token blocks of ``seq_len`` tokens (labels = inputs), a map-style dataset."""

    def __init__(self, n: int, seq_len: int = SEQ_LEN, vocab: int = 2048, seed: int = 0):
        import torch

        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, seq_len), generator=generator)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def training_args(output_dir: str | Path, **overrides: Any):
    """CPU ``TrainingArguments`` for benchmark runs: no logging, saving, reporting or progress bar."""
    from transformers import TrainingArguments

    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        max_steps=10,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


# ---- timing ---------------------------------------------------------------------------------


def interleaved(candidates: dict[str, Callable[[], float]], repetitions: int) -> dict[str, list[float]]:
    """Call each candidate once per repetition, alternating (A B A B ...), so drifts in machine load
    hit all of them alike. Each callable returns its own measurement; the lists are returned by name."""
    results: dict[str, list[float]] = {name: [] for name in candidates}
    order = list(candidates)
    for rep in range(repetitions):
        for name in order if rep % 2 == 0 else reversed(order):
            results[name].append(candidates[name]())
    return results


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Swallow what the block prints and warns (badam's prints and its float32 warning)."""
    import io
    import warnings

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---- child processes ------------------------------------------------------------------------


@dataclass(frozen=True)
class ChildRun:
    """A finished child process: exit status, wall time, peak RSS and the JSON it printed last (if any)."""

    returncode: int
    wall_seconds: float
    peak_rss_bytes: int | None
    output: str
    result: Any


def run_child(cmd: Sequence[str], *, timeout: float | None = None, env: dict[str, str] | None = None) -> ChildRun:
    """Run ``cmd`` and measure its own peak resident memory (``wait4``'s ``ru_maxrss``).

    If the child's last output line is JSON it is parsed into ``result`` — the way a benchmark
    gets figures back from a measurement made in a fresh process.
    """
    import tempfile

    from optiplug.app.compare import run_process

    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "child.log"
        process = run_process(cmd, log, timeout=timeout, env={**os.environ, **(env or {})})
        output = log.read_text(errors="replace")
    result = None
    lines = [line for line in output.splitlines() if line.strip()]
    if lines:
        with contextlib.suppress(ValueError):
            result = json.loads(lines[-1])
    return ChildRun(process.returncode, process.wall_seconds, process.peak_rss_bytes, output, result)


# ---- results --------------------------------------------------------------------------------


def script_name(file: str) -> str:
    """``benchmarks/core_overhead.py`` -> ``core_overhead``."""
    return Path(file).stem


def write_results(name: str, title: str, rows: list[dict[str, Any]], notes: str = "", **extra: Any) -> Path:
    """Write ``benchmarks/results/<name>.json`` (``title``, ``rows``, ``notes`` and any extra keys).

    Optional extra keys understood by ``run_all.py``: ``chart`` = ``{"x": column, "y": [columns],
    "kind": "bar" | "line", "ylabel": str}`` to choose the chart drawn from the rows.
    """
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    data = {"title": title, "rows": rows, "notes": notes, **extra}
    path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def mib(num_bytes: float | None) -> float | None:
    """Bytes to MiB, rounded to 0.1."""
    return None if num_bytes is None else round(num_bytes / 2**20, 1)


def machine() -> dict[str, Any]:
    """Where the numbers come from: CPU count, torch threads and versions."""
    import platform

    import torch
    import transformers

    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
