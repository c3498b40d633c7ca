"""Shared pytest fixtures live in tests/fixtures/, one module per real server we run."""

pytest_plugins = [
    "tests.fixtures.db",
    "tests.fixtures.sandbox",
    "tests.fixtures.auth",
    "tests.fixtures.app",
    "tests.fixtures.jobs",
    "tests.fixtures.proxy",
]
