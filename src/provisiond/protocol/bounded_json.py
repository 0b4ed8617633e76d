"""JSON from the network, decoded with a bound on its nesting depth.

msgspec decodes nested arrays and objects recursively and raises :class:`RecursionError` at
Python's recursion limit, which depends on how deep the caller's stack already is: a 2 KB body
of 1,000 brackets is enough. :func:`decode` refuses anything nested deeper than
:data:`MAX_DEPTH` before msgspec sees it, with a cheap scan (C-speed bytes operations; it only
runs when the body has more than :data:`MAX_DEPTH` brackets at all), and reports every failure
as :class:`msgspec.DecodeError` (or its subclass :class:`msgspec.ValidationError` for a value of
the wrong type), so that callers keep one ``except`` for bad JSON.

Use it for bytes that came from a peer (a device, a service client, a webhook, the service as
seen by the device client); documents provisiond wrote itself are decoded with msgspec directly.
"""

from __future__ import annotations

import re
from array import array
from itertools import accumulate
from typing import Any, TypeVar, overload

import msgspec

__all__ = ["MAX_DEPTH", "REPLY_MAX_DEPTH", "decode", "nesting_depth"]

T = TypeVar("T")

#: The deepest nesting accepted. DPS documents need about 15 levels (an enrollment in a bulk
#: operation, its initialTwin, and IoT Hub's 10 levels of twin properties).
MAX_DEPTH = 64
#: The deepest nesting the device client accepts in the service's answers: they carry what the
#: device sent (its ``payload``) two levels deeper than the device sent it.
REPLY_MAX_DEPTH = MAX_DEPTH + 16

# A JSON string: quote, then runs of plain characters and escapes (unrolled), then its closing
# quote, or the end of the data for a string never closed (with its last escape cut short). Every
# quote it tries from matches, so one pass over the data: a pattern that needed the closing quote
# failed from every quote of an unclosed string and tried again from the next, which took
# quadratic time (26 s for a 96 KB register body of escaped quotes, the event loop stalled).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
# Opening brackets to +1, closing ones to -1 (as signed bytes).
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


def nesting_depth(data: bytes, *, at_least: int = 0) -> int:
    """How deeply the arrays and objects of ``data`` nest (brackets inside strings do not
    count). Returns 0 early when ``data`` has no more than ``at_least`` opening brackets (so it
    cannot nest deeper than that). Malformed JSON gets a number too; the decoder refuses it."""
    if data.count(b"[") + data.count(b"{") <= at_least:
        return 0
    steps = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS).translate(_STEPS)
    return max(accumulate(array("b", steps)), default=0)


@overload
def decode(data: bytes, *, max_depth: int = MAX_DEPTH) -> Any: ...
@overload
def decode(data: bytes, type: type[T], *, max_depth: int = MAX_DEPTH) -> T: ...
def decode(data: bytes, type: Any = Any, *, max_depth: int = MAX_DEPTH) -> Any:
    """``msgspec.json.decode(data, type=type)``, refusing JSON nested deeper than ``max_depth``.

    :raises msgspec.ValidationError: a value of the wrong type (the message names the field).
    :raises msgspec.DecodeError: not JSON, or nested too deeply.
    """
    depth = nesting_depth(data, at_least=max_depth)
    if depth > max_depth:
        raise msgspec.DecodeError(f"JSON nested {depth} levels deep (the limit is {max_depth})")
    try:
        return msgspec.json.decode(data, type=type)
    except RecursionError:  # not within these limits; kept so that it can never become a 500
        raise msgspec.DecodeError(f"JSON nested too deeply (the limit is {max_depth})") from None
