"""IoT Hub's rules for device twins, in one pure module: whatever writes a twin checks it here
first (an enrollment's initial twin in PUT and bulk, a custom allocation webhook's, and later
the built-in hub's twin API), so that nothing stored can break a registration or a query.

The rules are Microsoft's, from "Understand and use device twins in IoT Hub"
(https://learn.microsoft.com/azure/iot-hub/iot-hub-devguide-device-twins, sections "Tags and
properties format" and "Device twin size"):

* **Keys** are case-sensitive, up to 1 KB of UTF-8, and contain no control character (Unicode
  C0 and C1), no ``.``, no ``$`` and no space.
* **Values** are booleans, numbers, strings, objects or arrays (and ``null``, which means
  "absent"). Integers lie within -4503599627370496 .. 4503599627370495; strings are up to 4 KB
  of UTF-8.
* **Depth**: objects nest at most 10 levels below ``tags``, ``properties.desired`` and
  ``properties.reported`` (the document's example: ``tags.one.two...ten.property``).
  provisiond counts an array as a level too, so that no nesting, of any kind, goes deeper.
* **Size**: at most 8 KB for ``tags`` and 32 KB each for ``properties.desired`` and
  ``properties.reported``, counted as IoT Hub counts: the sum, over every property, of its key's
  length and its value's size; strings count their characters (control characters excluded),
  numbers 8, booleans 4, objects and arrays what they contain.

:func:`check_section` raises :class:`~provisiond.errors.TwinLimitError` naming the rule and
where in the document it broke; it never raises anything else, whatever the input.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

from .errors import TwinLimitError

__all__ = [
    "MAX_DEPTH",
    "MAX_INTEGER",
    "MAX_KEY_BYTES",
    "MAX_STRING_BYTES",
    "MIN_INTEGER",
    "TwinSection",
    "check_initial_twin",
    "check_section",
]

MAX_DEPTH = 10
MAX_KEY_BYTES = 1024
MAX_STRING_BYTES = 4 * 1024
MIN_INTEGER = -4503599627370496
MAX_INTEGER = 4503599627370495
_NUMBER_SIZE = 8
_BOOLEAN_SIZE = 4
_FORBIDDEN_IN_KEYS = frozenset(".$ ")


class TwinSection(enum.Enum):
    """A part of a twin that IoT Hub limits, with its name in the document and its size limit."""

    TAGS = ("tags", 8 * 1024)
    DESIRED = ("properties.desired", 32 * 1024)
    REPORTED = ("properties.reported", 32 * 1024)

    @property
    def label(self) -> str:
        return self.value[0]

    @property
    def max_size(self) -> int:
        return self.value[1]


def _is_control(char: str) -> bool:
    code = ord(char)
    return code < 0x20 or 0x7F <= code <= 0x9F


def _text_size(text: str) -> int:
    """A string's size as IoT Hub counts it: its characters, control characters excluded."""
    return sum(1 for char in text if not _is_control(char))


def _shown(path: str) -> str:
    return path if len(path) <= 200 else path[:200] + "..."


def _check_key(key: str, path: str) -> None:
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise TwinLimitError(f"{_shown(path)}: keys are limited to {MAX_KEY_BYTES} bytes (1 KB) of UTF-8.")
    bad = sorted({char for char in key if char in _FORBIDDEN_IN_KEYS or _is_control(char)})
    if bad:
        shown = ", ".join(repr(char) for char in bad)
        raise TwinLimitError(
            f"{_shown(path)}: twin keys cannot contain {shown} (IoT Hub excludes '.', '$', spaces and "
            "control characters)."
        )


def _value_size(value: Any, path: str, depth: int) -> int:
    """The size of ``value`` (at ``path``, ``depth`` levels below the section), checked."""
    if value is None:
        return 0
    if isinstance(value, bool):
        return _BOOLEAN_SIZE
    if isinstance(value, int):
        if not MIN_INTEGER <= value <= MAX_INTEGER:
            raise TwinLimitError(
                f"{_shown(path)}: integers must lie within {MIN_INTEGER} and {MAX_INTEGER} (IoT Hub's range)."
            )
        return _NUMBER_SIZE
    if isinstance(value, float):
        return _NUMBER_SIZE
    if isinstance(value, str):
        if len(value.encode("utf-8", "surrogatepass")) > MAX_STRING_BYTES:
            raise TwinLimitError(
                f"{_shown(path)}: string values are limited to {MAX_STRING_BYTES} bytes (4 KB) of UTF-8."
            )
        return _text_size(value)
    if isinstance(value, Mapping | list):
        if depth >= MAX_DEPTH:
            raise TwinLimitError(
                f"{_shown(path)}: nested deeper than {MAX_DEPTH} levels (IoT Hub's limit for twin "
                "tags and properties)."
            )
        if isinstance(value, list):
            return sum(_value_size(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))
        return _members_size(value, path, depth + 1)
    raise TwinLimitError(f"{_shown(path)}: {type(value).__name__} is not a JSON value.")


def _members_size(members: Mapping[Any, Any], path: str, depth: int) -> int:
    size = 0
    for key, value in members.items():
        if not isinstance(key, str):
            raise TwinLimitError(f"{_shown(path)}: twin keys must be strings.")
        where = f"{path}.{key[:64]}"
        _check_key(key, where)
        size += _text_size(key) + _value_size(value, where, depth)
    return size


def check_section(members: Mapping[str, Any] | None, section: TwinSection, *, prefix: str = "") -> int:
    """Check one section of a twin (``tags``, ``properties.desired`` or ``.reported``) against
    every rule; return its size. ``prefix`` names where the section sits in the request
    (``initialTwin``) for the messages.

    :raises TwinLimitError: the first rule broken, with where it broke.
    """
    if members is None:
        return 0
    path = f"{prefix}.{section.label}" if prefix else section.label
    size = _members_size(members, path, 0)
    if size > section.max_size:
        raise TwinLimitError(
            f"{path} is {size} bytes as IoT Hub counts them; the limit is {section.max_size} "
            f"({section.max_size // 1024} KB)."
        )
    return size


def check_initial_twin(
    tags: Mapping[str, Any] | None, desired: Mapping[str, Any] | None, *, prefix: str = "initialTwin"
) -> None:
    """Check an initial twin's tags and desired properties (what DPS writes into the hub).

    :raises TwinLimitError: the first rule broken, with where it broke.
    """
    check_section(tags, TwinSection.TAGS, prefix=prefix)
    check_section(desired, TwinSection.DESIRED, prefix=prefix)
