"""IoT Hub's twin rules (src/provisiond/twin_limits.py), checked on their own: every rule at its
boundary, the size as IoT Hub counts it, and messages that say where a rule broke."""

from __future__ import annotations

from typing import Any

import pytest

from provisiond.errors import InvalidBodyError, TwinLimitError
from provisiond.twin_limits import (
    MAX_INTEGER,
    MIN_INTEGER,
    TwinSection,
    check_initial_twin,
    check_section,
)


def nested(levels: int, leaf: Any = "value") -> dict[str, Any]:
    """``{"l1": {"l2": ... {"lN": {"property": leaf}}}}``: ``levels`` objects below the root."""
    doc: dict[str, Any] = {"property": leaf}
    for level in range(levels, 0, -1):
        doc = {f"l{level}": doc}
    return doc


def test_the_documented_ten_levels_pass_and_an_eleventh_fails() -> None:
    # Microsoft's example: tags.one.two...ten.property is the deepest valid twin.
    check_section(nested(10), TwinSection.TAGS)
    check_section(nested(10), TwinSection.DESIRED)
    with pytest.raises(TwinLimitError, match=r"tags\.l1\.l2.*\.l11: nested deeper than 10 levels"):
        check_section(nested(11), TwinSection.TAGS)


def test_arrays_count_as_levels_so_nothing_nests_deeper() -> None:
    check_section({"a": [[[1]]]}, TwinSection.DESIRED)
    deep: Any = 1
    for _ in range(900):
        deep = [deep]
    with pytest.raises(TwinLimitError, match=r"properties\.desired\.a(\[0\])+: nested deeper"):
        check_section({"a": deep}, TwinSection.DESIRED)


@pytest.mark.parametrize(
    ("key", "words"),
    [
        pytest.param("a.b", "'.'", id="dot"),
        pytest.param("$version", "'$'", id="dollar"),
        pytest.param("two words", "' '", id="space"),
        pytest.param("tab\there", "'\\t'", id="c0-control"),
        pytest.param("c1\x85", "'\\x85'", id="c1-control"),
    ],
)
def test_forbidden_key_characters(key: str, words: str) -> None:
    with pytest.raises(TwinLimitError) as caught:
        check_section({"ok": {key: 1}}, TwinSection.TAGS, prefix="initialTwin")
    assert caught.value.message.startswith("initialTwin.tags.ok.")
    assert words in caught.value.message
    assert isinstance(caught.value, InvalidBodyError) and caught.value.error_code == 400004


def test_key_length_is_one_kilobyte_of_utf8() -> None:
    check_section({"k" * 1024: 1}, TwinSection.TAGS)
    with pytest.raises(TwinLimitError, match="1024 bytes"):
        check_section({"k" * 1025: 1}, TwinSection.TAGS)
    with pytest.raises(TwinLimitError, match="1024 bytes"):  # 513 characters, 1026 bytes
        check_section({"é" * 513: 1}, TwinSection.TAGS)


def test_values() -> None:
    check_section(
        {"b": True, "n": None, "f": 1.5, "i": MAX_INTEGER, "j": MIN_INTEGER, "s": "x" * 4096, "l": [1, "a"]},
        TwinSection.DESIRED,
    )
    for bad in (MAX_INTEGER + 1, MIN_INTEGER - 1):
        with pytest.raises(TwinLimitError, match="integers must lie within"):
            check_section({"i": bad}, TwinSection.DESIRED)
    with pytest.raises(TwinLimitError, match=r"properties\.desired\.s: string values are limited to 4096"):
        check_section({"s": "x" * 4097}, TwinSection.DESIRED)
    with pytest.raises(TwinLimitError, match="not a JSON value"):
        check_section({"o": object()}, TwinSection.DESIRED)


def test_size_is_counted_as_iot_hub_counts_it() -> None:
    # keys and strings by characters (control characters excluded), numbers 8, booleans 4.
    assert check_section({"ab": "xyz", "n": 5, "t": True}, TwinSection.TAGS) == (2 + 3) + (1 + 8) + (1 + 4)
    assert check_section({"a": {"b": [1, "cd", None]}}, TwinSection.TAGS) == 1 + 1 + 8 + 2
    assert check_section({"s": "a\u0001b"}, TwinSection.TAGS) == 1 + 2
    assert check_section(None, TwinSection.TAGS) == 0


def test_section_size_limits() -> None:
    # 8 KB of tags: two properties of 4 KB strings with one-character keys fit exactly...
    tags = {"a": "x" * 4095, "b": "y" * 4095}
    assert check_section(tags, TwinSection.TAGS) == 8192
    # ... one more character does not.
    with pytest.raises(TwinLimitError, match=r"^tags is 8193 bytes .* limit is 8192 \(8 KB\)"):
        check_section({**tags, "c": ""}, TwinSection.TAGS)
    # 32 KB of desired properties (and of reported ones).
    desired = {f"k{i}": "z" * 4094 for i in range(8)}  # 8 x (2 + 4094) = 32768
    assert check_section(desired, TwinSection.DESIRED) == 32768
    with pytest.raises(TwinLimitError, match="limit is 32768"):
        check_section({**desired, "x": 1}, TwinSection.REPORTED)


def test_initial_twin_checks_tags_and_desired() -> None:
    check_initial_twin({"site": "a"}, {"rate": 5})
    check_initial_twin(None, None)
    with pytest.raises(TwinLimitError, match=r"^initialTwin\.properties\.desired\.a\.b"):
        check_initial_twin({"site": "a"}, {"a": {"b.c": 1}})
