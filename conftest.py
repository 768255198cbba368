"""Repository-wide test setup (every testpath: tests/ and plugins/*/tests).

Tiny-model tests run one torch thread per process: with pytest-xdist using both cores, extra
threads only contend (a tiny Llama step measured ~10 ms on one thread, ~1.5 s on two under load).
Child processes (torchrun, `python -m optiplug`) inherit the same environment.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

pytest_plugins = ["optiplug.testing"]  # tiny_llama helpers and the temp_plugin fixture, for every testpath
