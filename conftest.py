"""Repository-wide test setup for every testpath (tests/ and plugins/*/tests): optiplug.testing, loaded as a pytest
plugin, sets the test environment (one torch thread, offline, quiet) and provides the shared fixtures."""

pytest_plugins = ["optiplug.testing"]
