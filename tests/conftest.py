"""Fixtures shared by the test files."""

from __future__ import annotations

import pytest

from megatron_sip import platform


@pytest.fixture
def cpu_platform():
    """The CPU platform active for one test, undone after it."""
    platform.activate("cpu")
    try:
        yield
    finally:
        platform.deactivate()
