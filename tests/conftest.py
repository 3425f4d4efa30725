"""Shared fixtures. Data from ../shared is reached only through PERSONA4REC_SHARED."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only shared data folder; skips the test when it is not configured."""
    value = os.environ.get("PERSONA4REC_SHARED")
    if not value or not Path(value).is_dir():
        pytest.skip("PERSONA4REC_SHARED is not set to the shared data folder")
    return Path(value)
