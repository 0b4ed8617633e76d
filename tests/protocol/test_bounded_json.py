"""The nesting bound of JSON from the network (protocol/bounded_json.py): brackets inside
strings do not count, strings never closed do not either, and the scan is one pass whatever
the data (a register body of escaped quotes once took 26 s and stalled the event loop)."""

from __future__ import annotations

import msgspec
import pytest

from provisiond.protocol.bounded_json import MAX_DEPTH, decode, nesting_depth


@pytest.mark.parametrize(
    ("data", "depth"),
    [
        (b"[]", 1),
        (b'[[["a]]]"]]]', 3),
        (b'[{"a": "[[{{", "b": [1, {"c": "]]"}]}]', 4),
        (b'["\\\\"]', 1),  # an escaped backslash, then the closing quote
        (b'["\\"[[["]', 1),  # an escaped quote inside the string
        (b'[["unclosed [[[', 2),  # the rest is inside a string that never closes
        (b'[["unclosed \\', 2),  # ... ending with half an escape
    ],
)
def test_depth_counts_brackets_outside_strings(data: bytes, depth: int) -> None:
    assert nesting_depth(data) == depth


@pytest.mark.parametrize("tail", [b"", b"\\"], ids=["open-string", "open-string-half-escape"])
def test_a_body_of_escaped_quotes_is_scanned_in_one_pass(tail: bytes) -> None:
    """96 KB under the body limit: 65 brackets, then a string of 48,000 escaped quotes that never
    closes. Each quote was a place the string pattern started again and failed at the end of the
    data (quadratic: 26 s); now the pattern matches from the first quote to the end."""
    data = b"[" * 65 + b'"' + b'\\"' * 48_000 + tail
    assert nesting_depth(data) == 65
    with pytest.raises(msgspec.DecodeError, match="nested 65 levels deep"):
        decode(data)


def test_nesting_within_the_limit_decodes() -> None:
    data = b"[" * MAX_DEPTH + b"]" * MAX_DEPTH
    assert nesting_depth(data) == MAX_DEPTH and decode(data) is not None
