"""Fixtures for the frontend's tests (the fakes they use are in frontend_fakes.py)."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest


@pytest.fixture
def ipc_dir():
    """A short directory for ipc:// sockets (their paths are limited to about 100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="flk", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
