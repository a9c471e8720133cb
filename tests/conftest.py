"""Fixtures for every test module come from the plugin modules below; import types and helpers
from those modules, never from here."""

pytest_plugins = [
    "tests.pg_fixtures",
    "tests.receiver_harness",
    "tests.backup_fixtures",
    "tests.netfaults",
    "tests.s3_fixtures",
]
