"""Straight-line encoders and decoders of the composites, made once per class (as
:mod:`dataclasses` makes ``__init__``): :mod:`.performatives` declares each composite's fields
with their kinds; here its writer (the described list's bytes, as the generic loop of
:func:`~.performatives.write_composite` would write them) and its reader (the composite from
the decoded list's items) become one function each, with no loop over the fields, no lookups
of field attributes, and each field's kind, default and name bound as constants.

A reader only handles well-formed items: on any decode error it hands the items to the
generic function, which raises the error naming the field.

A composite's *byte reader* (:func:`make_reader_at`) goes one step further: it reads the
described list's fields straight from the frame's bytes (no list of items, no
:class:`~.values.Described` for a nested composite such as an attach's source and target), the
commonest constructors inline, any other through the generic decoder. It handles only what it
recognises: on anything else (a malformed or unusual encoding) it gives up with
:class:`Unrecognised`, and the caller decodes the same bytes the generic way, which accepts it
or raises the error it always did.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from ...errors import AmqpProtocolError

__all__ = ["FieldSpec", "Unrecognised", "make_reader", "make_reader_at", "make_writer"]


class FieldSpec(NamedTuple):
    name: str
    mandatory: bool
    default: Any
    #: ``write(value, buffer)``: the field's encoding
    write: Callable[[Any, bytearray], None]
    #: ``decode(item)``: the field's value from the decoded item (raises AmqpProtocolError)
    decode: Callable[[Any], Any]
    #: whether the field may hold a composite (``*``: an attach's source and target)
    composite: bool = False


class Unrecognised(Exception):
    """A byte reader met an encoding it does not handle: decode the bytes the generic way."""


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


def make_reader_at(
    cls: type, fields: Sequence[FieldSpec], wire: dict[str, Any], readers: dict[int, Any]
) -> Callable[[bytes, int, int, int], tuple[Any, int]]:
    """``read_at(buf, pos, end, depth)``: an instance of ``cls`` from the list whose constructor
    is at ``buf[pos]`` (the bytes after the descriptor), and the position after the list; the
    same value the generic path (the list's items, then :func:`make_reader`'s reader) makes.
    ``wire`` holds the decoder's pieces (``_decode``, ``_utf8``, ``_ascii``, the shared small
    integers, ``_MAX`` the deepest nesting); ``readers`` maps a composite's descriptor code to its byte reader, for fields
    that may hold one. Raises :class:`Unrecognised` for anything it does not handle."""
    names: dict[str, Any] = {**wire, "_cls": cls, "_new": object.__new__, "_U": Unrecognised}
    names["_readers"] = readers
    names["_II"] = struct.Struct(">II").unpack_from
    lines = [
        "def read_at(buf, pos, end, depth):",
        "    if depth > _MAX:  # nested too deep: the generic path says so",
        "        raise _U",
        "    code = buf[pos]",
        "    if code == 0xC0:",
        "        if pos + 3 > end:",
        "            raise _U",
        "        stop = pos + 2 + buf[pos + 1]",
        "        n = buf[pos + 2]",
        "        pos += 3",
        "    elif code == 0xD0:",
        "        if pos + 9 > end:",
        "            raise _U",
        "        size, n = _II(buf, pos + 1)",
        "        stop = pos + 5 + size",
        "        pos += 9",
        "    elif code == 0x45:",
        "        stop = pos = pos + 1",
        "        n = 0",
        "    else:",
        "        raise _U",
        "    if stop > end or n > stop - pos:",
        "        raise _U",
    ]
    for index, field in enumerate(fields):
        names[f"_R{index}"] = field.decode
        if field.mandatory:
            null = "raise _U"
        else:
            names[f"_D{index}"] = field.default
            null = f"v{index} = _D{index}"
        lines += [
            f"    if n > {index}:",
            "        if pos >= stop:",
            "            raise _U",
            "        c = buf[pos]",
            "        if c == 0x40:",
            f"            {null}",
            "            pos += 1",
            "        elif c == 0x52 or c == 0x53 or c == 0x50:",
            "            if pos + 2 > stop:",
            "                raise _U",
            f"            v{index} = _R{index}((_SU if c == 0x52 else _SL if c == 0x53 else _UB)[buf[pos + 1]])",
            "            pos += 2",
            "        elif c == 0x41 or c == 0x42:",
            f"            v{index} = _R{index}(c == 0x41)",
            "            pos += 1",
            "        elif c == 0xA1 or c == 0xA3 or c == 0xA0:",
            "            s = pos + 2 + buf[pos + 1]",
            "            if s > stop:",
            "                raise _U",
            "            r = buf[pos + 2 : s]",
            f"            v{index} = _R{index}(_utf8(r) if c == 0xA1 else _ascii(r) if c == 0xA3 else r)",
            "            pos = s",
        ]
        if field.composite:  # a nested composite: its own byte reader, no described value between
            lines += [
                "        elif c == 0 and pos + 4 <= stop and buf[pos + 1] == 0x53 and buf[pos + 2] in _readers:",
                f"            v{index}, pos = _readers[buf[pos + 2]](buf, pos + 3, stop, depth + 2)",
            ]
        lines += [
            "        else:",
            "            r, pos = _decode(buf, pos, stop, depth)",
            "            if r is None:",
            f"                {null}",
            "            else:",
            f"                v{index} = _R{index}(r)",
            "    else:",
            f"        {null}",
        ]
    lines += [
        f"    for _ in range(n - {len(fields)}):  # elements past the known fields: decoded, not kept",
        "        r, pos = _decode(buf, pos, stop, depth)",
        "    if pos != stop:",
        "        raise _U",
        "    value = _new(_cls)",
        "    value.__dict__.update({" + ", ".join(f"{f.name!r}: v{i}" for i, f in enumerate(fields)) + "})",
        "    return value, stop",
    ]
    reader: Callable[[bytes, int, int, int], tuple[Any, int]] = _compile(lines, names, "read_at")
    return reader


def _compile(lines: list[str], names: dict[str, Any], function: str) -> Any:
    exec("\n".join(lines), names)  # the code is made here from field names, never from input
    return names[function]
