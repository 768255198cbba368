"""The registry-wide Trainer tests over the whole bridged catalogue (the suite runs a fixed sample of it).

Runs optiplug's smoke test (12 steps, the loss decreases) and exact-resume test
(tests/test_every_optimizer.py) for every ``po_`` optimizer, or for the names given, and prints one line per
test. About 8 minutes on one core::

    OMP_NUM_THREADS=1 python plugins/pytorch_optimizer/scripts/trainer_all.py [po_lion ...]
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import warnings
from pathlib import Path

REGISTRY_TESTS = Path(__file__).resolve().parents[3] / "tests" / "test_every_optimizer.py"


def main(names: list[str]) -> int:
    """Run both tests for ``names`` (default: the whole catalogue); return the number of failures."""
    from optiplug_pytorch_optimizer.catalogue import specs

    warnings.simplefilter("ignore")
    spec = importlib.util.spec_from_file_location("registry_tests", REGISTRY_TESTS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tests = (
        module.test_smoke_every_optimizer_learns,
        module.test_resume_every_optimizer_reproduces_the_uninterrupted_run,
    )
    failures = 0
    for name in names or list(specs()):
        for test in tests:
            with tempfile.TemporaryDirectory() as directory:
                try:
                    test(name, Path(directory))
                    outcome = "ok"
                except Exception as error:  # report and go on: this is a survey of the catalogue
                    failures += 1
                    outcome = f"FAIL {type(error).__name__}: {str(error).splitlines()[0][:200]}"
            print(f"{name} {test.__name__}: {outcome}", file=sys.stderr, flush=True)
    return failures


if __name__ == "__main__":
    raise SystemExit(min(main(sys.argv[1:]), 1))
