"""Queue and channel names: the one rule for what a name may be.

Owns: name validation, shared by the command parser and the storage engine (which uses names as
directory names, so a name must never reach a path outside the data directory).
Rule: 1-200 bytes of [A-Za-z0-9_.:-], not starting with "." (so no "", ".", ".." or hidden files).
"""
from __future__ import annotations

import re

from floki.errors import InvalidParameter

MAX_NAME_BYTES = 200
_NAME = re.compile(rb"[A-Za-z0-9_.:\-]{1,200}\Z")


def validate_name(raw: bytes | str) -> str:
    """Returns the name as str. Raises InvalidParameter for anything but a safe name."""
    if isinstance(raw, str):
        try:
            raw = raw.encode("ascii")
        except UnicodeEncodeError:
            raise InvalidParameter("Invalid Identifier Name") from None
    if not _NAME.match(raw) or raw[:1] == b".":
        raise InvalidParameter("Invalid Identifier Name")
    return raw.decode("ascii")
