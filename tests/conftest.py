"""Fixtures shared by the test files."""

import os

import pytest


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A trilut cache (``TRILUT_CACHE``) private to this test session, so every yosys or
    Verilator result a test asserts on comes from a real run, not from a developer's cache.
    xdist workers have a base each inside the session's one: they share the session's."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "trilut-cache"
    root.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRILUT_CACHE", str(root))
        yield root
