"""Fixtures of the integration tests."""

from tests.integration.serving import server  # noqa: F401 (the served app, for the API and browser tests)
