"""Straight-line encoders and decoders of the composites, made once per class (as
:mod:`dataclasses` makes ``__init__``): :mod:`.performatives` declares each composite's fields
with their kinds; here its writer (the described list's bytes, as the generic loop of
:func:`~.performatives.write_composite` would write them) and its reader (the composite from
the decoded list's items) become one function each, with no loop over the fields, no lookups
of field attributes, and each field's kind, default and name bound as constants.

A reader only handles well-formed items: on any decode error it hands the items to the
generic function, which raises the error naming the field.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from ...errors import AmqpProtocolError

__all__ = ["FieldSpec", "make_reader", "make_writer"]


class FieldSpec(NamedTuple):
    name: str
    mandatory: bool
    default: Any
    #: ``write(value, buffer)``: the field's encoding
    write: Callable[[Any, bytearray], None]
    #: ``decode(item)``: the field's value from the decoded item (raises AmqpProtocolError)
    decode: Callable[[Any], Any]


def make_writer(prefix: bytes, fields: Sequence[FieldSpec]) -> Callable[[Any, bytearray], None]:
    """``write(value, buffer)``: ``prefix`` (the descriptor) and the list of ``value``'s
    fields, each null when it is None or (optional) equal to its default, trailing nulls cut."""
    names: dict[str, Any] = {"_PREFIX": prefix, "_pack": struct.Struct(">II").pack}
    lines = ["def write(value, buffer):", "    body = bytearray()", "    size = count = 0"]
    for index, field in enumerate(fields):
        names[f"_W{index}"] = field.write
        lines.append(f"    v = value.{field.name}")
        if field.mandatory or field.default is None:
            lines.append("    if v is None:")
        else:
            names[f"_D{index}"] = field.default
            lines.append(f"    if v is None or v == _D{index}:")
        lines += [
            "        body.append(0x40)",
            "    else:",
            f"        _W{index}(v, body)",
            f"        size, count = len(body), {index + 1}",
        ]
    lines += [
        "    del body[size:]",
        "    buffer += _PREFIX",
        "    if not count:",
        "        buffer.append(0x45)",
        "    elif size < 255 and count < 256:",
        "        buffer += bytes((0xC0, size + 1, count))",
        "    else:",
        "        buffer.append(0xD0)",
        "        buffer += _pack(size + 4, count)",
        "    buffer += body",
    ]
    writer: Callable[[Any, bytearray], None] = _compile(lines, names, "write")
    return writer


def make_reader(
    cls: type, fields: Sequence[FieldSpec], generic: Callable[[type, list[Any]], Any]
) -> Callable[[list[Any]], Any]:
    """``read(items)``: an instance of ``cls`` (a non-slotted class, made without its
    ``__init__``) from a described list's items; ``generic(cls, items)`` when one is wrong."""
    names: dict[str, Any] = {"_cls": cls, "_new": object.__new__, "_generic": generic}
    names["AmqpProtocolError"] = AmqpProtocolError
    lines = ["def read(items):", "    n = len(items)", "    try:", "        pass"]
    for index, field in enumerate(fields):
        names[f"_R{index}"] = field.decode
        lines.append(f"        r = items[{index}] if n > {index} else None")
        if field.mandatory:
            lines += [
                "        if r is None:",
                "            raise AmqpProtocolError('')",
                f"        v{index} = _R{index}(r)",
            ]
        else:
            names[f"_D{index}"] = field.default
            lines.append(f"        v{index} = _D{index} if r is None else _R{index}(r)")
    lines += [
        "    except AmqpProtocolError:",
        "        return _generic(_cls, items)",
        "    value = _new(_cls)",
        "    value.__dict__.update({" + ", ".join(f"{f.name!r}: v{i}" for i, f in enumerate(fields)) + "})",
        "    return value",
    ]
    reader: Callable[[list[Any]], Any] = _compile(lines, names, "read")
    return reader


def _compile(lines: list[str], names: dict[str, Any], function: str) -> Any:
    exec("\n".join(lines), names)  # the code is made here from field names, never from input
    return names[function]
