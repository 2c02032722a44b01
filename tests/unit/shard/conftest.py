"""Storage unit tests: fileio routed through os at call time.

floki.shard.fileio binds the os functions themselves (no per-call indirection in production),
so a test that monkeypatches os.fsync or os.write would no longer reach the storage engine. This
autouse fixture installs faultfs.OsLayer, which looks each operation up on `os` when it is
called, for every test here; tests that need faults install a FaultyFileIO on top of it.
"""
from __future__ import annotations

import pytest

from faultfs import OsLayer
from floki.shard import fileio


@pytest.fixture(autouse=True)
def os_lookup_file_layer():
    with fileio.installed(OsLayer()):
        yield
