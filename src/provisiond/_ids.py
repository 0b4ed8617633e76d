"""Random identifiers in UUID version 4's text form (``8-4-4-4-12`` hex digits).

:func:`uuid4_text` makes the same string as ``str(uuid.uuid4())`` from 16 bytes of
``os.urandom``, without building a :class:`uuid.UUID` (its int conversion, version check and
``__str__`` cost about two thirds of the call). A registration makes three: its operation id
and two etags.
"""

from __future__ import annotations

import os

__all__ = ["uuid4_text"]


def uuid4_text() -> str:
    """A random UUID (version 4, RFC 9562's variant), as lower-case text with hyphens."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # the variant
    digits = raw.hex()
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"
