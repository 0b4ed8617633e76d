"""Random identifiers in UUID version 4's text form (``8-4-4-4-12`` hex digits).

:func:`uuid4_text` makes the same string as ``str(uuid.uuid4())`` from 16 bytes of
``os.urandom``, without building a :class:`uuid.UUID` (its int conversion, version check and
``__str__`` cost about two thirds of the call). A registration makes three: its operation id
and two etags. :func:`random_below` draws the built-in hub's numeric identifiers from the same
bytes.

The bytes come from a buffer of ``os.urandom`` refilled every 256 identifiers: one
``getrandom`` system call each would be three per registration. Each part of the buffer is
handed out once (under a lock: the store's writer thread makes etags too), and a forked child
starts with an empty buffer, so that parent and child never share identifiers.
"""

from __future__ import annotations

import os
import threading

__all__ = ["random_below", "uuid4_text"]

_BUFFER_SIZE = 4096
_buffer = b""
_offset = 0
_lock = threading.Lock()


def _forget() -> None:
    global _buffer, _offset, _lock
    _buffer, _offset, _lock = b"", 0, threading.Lock()


os.register_at_fork(after_in_child=_forget)


def _random16() -> bytes:
    """16 bytes from ``os.urandom``, taken from the buffer."""
    global _buffer, _offset
    with _lock:
        start = _offset
        if start + 16 > len(_buffer):
            _buffer, start = os.urandom(_BUFFER_SIZE), 0
        _offset = start + 16
        return _buffer[start : start + 16]


def uuid4_text() -> str:
    """A random UUID (version 4, RFC 9562's variant), as lower-case text with hyphens."""
    raw = bytearray(_random16())
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # the variant
    digits = raw.hex()
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def random_below(bound: int) -> int:
    """A random integer in ``[0, bound)``, for ``bound`` below 2**64: 128 random bits reduced
    modulo ``bound``, whose bias (under 2**-64) no identifier can show, for about half the cost
    of ``secrets.randbelow`` (its rejection loop and ``SystemRandom``'s Python layers)."""
    if not 0 < bound < 1 << 64:
        raise ValueError(f"bound {bound} is not in (0, 2**64)")
    return int.from_bytes(_random16()) % bound
