"""Repository-wide test setup for every testpath (tests/ and plugins/*/tests): optiplug.testing, loaded as a pytest
plugin, sets the test environment (one torch thread, offline, quiet) and provides the shared fixtures;
optiplug.testing_launch provides the fsdp2 and deepspeed fixtures (the shared launches' results)."""

from __future__ import annotations

import pytest

pytest_plugins = ["optiplug.testing", "optiplug.testing_launch"]


@pytest.fixture(autouse=True)
def _fresh_cwd(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own empty working directory: nothing a user (or `optiplug train`'s default
    `outputs/optiplug-run`) left in the checkout can change a result, and no test writes into the checkout.
    Tests reach the repository's files by absolute paths (``Path(__file__)``)."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
