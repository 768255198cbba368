"""benchmarks/gpu_acceptance.py, the sharded acceptance script for GPU machines, run on CPU (``--device cpu``).

Its comparisons must be able to fail (a synthetic run with a loss gap, a lopsided work split, a lost resume),
and one short real run (2 processes, gloo, the tiny model) must pass them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_acceptance.py"


@pytest.fixture(scope="module")
def acceptance():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_acceptance

        yield gpu_acceptance
    finally:
        sys.path.remove(str(SCRIPT.parent))


def _rank(updates: int, flops: int, sharded: list[float], resumed: list[float], state: int = 50) -> dict:
    return {"losses": {"sharded": sharded, "single": [4.0, 3.0, 2.0, 1.0], "resumed": resumed}, "weights_gap": 0.0,
            "state_sharded": state, "state_single": 100, "estimate": 50, "matrices": 14, "updates": updates,
            "ns_flops": flops, "peak_sharded": None, "peak_single": None}  # fmt: skip


def test_the_comparisons_fail_on_a_gap_a_lost_resume_and_a_lopsided_split(acceptance):
    args = SimpleNamespace(device="cpu", size="tiny", steps=4, rtol=1e-5)
    good = [_rank(7, 50, [4.0, 3.0, 2.0, 1.0], [2.0, 1.0]), _rank(7, 50, [4.0, 3.0, 2.0, 1.0], [2.0, 1.0])]
    row, failed = acceptance.row_of("muon", good, args)
    assert failed == [] and row["updates_per_rank"] == "7/7" and row["ns_flops_share"] == "0.50/0.50"
    bad = [_rank(14, 100, [4.0, 3.0, 2.0, 1.1], [2.0, 1.2], state=90), _rank(0, 0, [4.0, 3.0, 2.0, 1.1], [2.0, 1.2])]
    _, failed = acceptance.row_of("muon", bad, args)
    assert [line.split(":")[1].split()[0] for line in failed] == ["loss", "the", "a", "optiplug", "matrix", "one"]


@pytest.mark.slow
def test_a_short_cpu_run_passes_its_assertions(tmp_path):
    results = tmp_path / "acceptance.json"
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--optimizers", "muon,schedule_free_adamw",
               "--steps", "4", "--no-deepspeed", "--families", "muon", "--results", str(results)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {row["optimizer"]: row for row in json.loads(results.read_text())["rows"] if row["engine"] == "FSDP2"}
    assert rows["muon"]["updates_per_rank"] == "7/7" and rows["muon"]["ns_flops_share"] == "0.50/0.50"
    assert all(row["loss_gap"] <= 1e-5 and row["resume_exact"] for row in rows.values()), rows
