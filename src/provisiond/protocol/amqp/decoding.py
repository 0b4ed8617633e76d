"""The AMQP 1.0 type decoder (Part 1 §1.2-§1.6), sans-io: :mod:`.types` is its public face
(``decode_value``) and says what each format code decodes to and what is refused.

It works on offsets into one ``bytes`` object: every decoder takes the buffer, the position
of its data (after the format code) and the end of what it may read, and returns the value
and the position after it. Nothing is sliced but the bodies of strings, symbols and binaries.
A value running past ``end`` raises :class:`~provisiond.errors.InsufficientData`: at the top
level that means "more bytes needed"; inside a compound (whose size bounds its elements) it
is turned into the decode error it is.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable
from typing import Any

from ...errors import AmqpProtocolError, InsufficientData
from .values import (
    CANONICAL,
    Array,
    Byte,
    Char,
    Decimal32,
    Decimal64,
    Decimal128,
    Described,
    Float,
    Int,
    Long,
    Short,
    Symbol,
    Timestamp,
    TypeCode,
    UByte,
    UInt,
    ULong,
    UShort,
)

__all__ = ["MAX_DEPTH", "MAX_EMPTY_ELEMENTS", "WIRE", "decode_at", "decode_value", "list_at"]

#: Deepest nesting of compound and described values the decoder accepts (DPS needs 4).
MAX_DEPTH = 32
#: Most elements an array of zero-width elements (nulls, uint0, ...) may claim.
MAX_EMPTY_ELEMENTS = 1024

#: A format code's decoder: (buffer, position after the code, end, depth) -> (value, position).
_Body = Callable[[bytes, int, int, int], tuple[Any, int]]


def _decode_error(message: str) -> AmqpProtocolError:
    return AmqpProtocolError(message, condition="amqp:decode-error")


def _fixed(fmt: str, wrap: Callable[[Any], Any]) -> _Body:
    packer = struct.Struct(fmt)
    size, unpack = packer.size, packer.unpack_from

    if fmt == ">B":  # one unsigned byte: no struct

        def decode_byte(buf: bytes, pos: int, end: int, depth: int) -> tuple[Any, int]:
            if pos >= end:
                raise InsufficientData
            return wrap(buf[pos]), pos + 1

        return decode_byte

    def decode(buf: bytes, pos: int, end: int, depth: int) -> tuple[Any, int]:
        if pos + size > end:
            raise InsufficientData
        return wrap(unpack(buf, pos)[0]), pos + size

    return decode


def _constant(value: Any) -> _Body:
    def decode(buf: bytes, pos: int, end: int, depth: int) -> tuple[Any, int]:
        return value, pos

    return decode


def _size(buf: bytes, pos: int, end: int, width: int) -> tuple[int, int]:
    """The body of a size-prefixed value (the size field is 1 or 4 bytes): (start, stop)."""
    if pos + width > end:
        raise InsufficientData
    if width == 1:
        start, stop = pos + 1, pos + 1 + buf[pos]
    else:
        start = pos + 4
        stop = start + int.from_bytes(buf[pos:start], "big")
    if stop > end:
        raise InsufficientData
    return start, stop


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _decode_error(f"A string is not valid UTF-8: {exc}") from None


#: Symbols met before, by their bytes: a peer's symbols come from small domains (mechanisms,
#: capabilities, property keys, error conditions), and a symbol is immutable, so one decoded
#: symbol is shared. Emptied when full, so that a peer sending many cannot grow it.
_SYMBOLS: dict[bytes, Symbol] = {}
_SYMBOL_ENTRIES = 512
_SHARED_SYMBOL_SIZE = 64


def _ascii(raw: bytes) -> Symbol:
    symbol = _SYMBOLS.get(raw)
    if symbol is not None:
        return symbol
    try:
        symbol = Symbol(raw.decode("ascii"))
    except UnicodeDecodeError:
        raise _decode_error("A symbol is not ASCII.") from None
    if len(raw) <= _SHARED_SYMBOL_SIZE:
        if len(_SYMBOLS) >= _SYMBOL_ENTRIES:
            _SYMBOLS.clear()
        _SYMBOLS[raw] = symbol
    return symbol


def _variable(width: int, wrap: Callable[[bytes], Any]) -> _Body:
    def decode(buf: bytes, pos: int, end: int, depth: int) -> tuple[Any, int]:
        start, stop = _size(buf, pos, end, width)
        return wrap(buf[start:stop]), stop

    return decode


def _char(value: int) -> Char:
    if value > 0x10FFFF or 0xD800 <= value <= 0xDFFF:
        raise _decode_error(f"{value:#x} is not a Unicode code point.")
    return Char(chr(value))


def _elements(buf: bytes, pos: int, end: int, count: int, depth: int, what: str) -> list[Any]:
    """``count`` values that must fill ``buf[pos:end]`` exactly."""
    if count > end - pos:  # every element has at least a one-byte constructor
        raise _decode_error(f"A {what} claims {count} elements in {end - pos} bytes.")
    items: list[Any] = []
    append = items.append
    depth += 1
    try:
        for _ in range(count):
            # The commonest elements of performatives inline, the others through _decode.
            code = buf[pos] if pos < end else -1
            if code == 0x40:  # null
                append(None)
                pos += 1
            elif code == 0x52 or code == 0x53 or code == 0x50:  # smalluint, smallulong, ubyte
                if pos + 2 > end:
                    raise InsufficientData
                append(
                    (_SMALL_UINT if code == 0x52 else _SMALL_ULONG if code == 0x53 else _UBYTES)[buf[pos + 1]]
                )
                pos += 2
            elif code == 0x41 or code == 0x42:  # true, false
                append(code == 0x41)
                pos += 1
            else:
                item, pos = _decode(buf, pos, end, depth)
                append(item)
    except InsufficientData:
        raise _decode_error(f"The elements of a {what} overrun its size.") from None
    if pos != end:
        raise _decode_error(f"A {what} has {end - pos} bytes after its {count} elements.")
    return items


def _counted(buf: bytes, pos: int, end: int, width: int, what: str) -> tuple[int, int, int]:
    """A compound's (first element, end of its elements, count)."""
    start, stop = _size(buf, pos, end, width)
    if stop - start < width:
        raise _decode_error(f"A {what} of size {stop - start} has no room for its count.")
    count = buf[start] if width == 1 else int.from_bytes(buf[start : start + 4], "big")
    return start + width, stop, count


def _compound(width: int, make: Callable[[list[Any]], Any], what: str) -> _Body:
    def decode(buf: bytes, pos: int, end: int, depth: int) -> tuple[Any, int]:
        first, stop, count = _counted(buf, pos, end, width, what)
        return make(_elements(buf, first, stop, count, depth, what)), stop

    return decode


def _map(items: list[Any]) -> dict[Any, Any]:
    if len(items) % 2:
        raise _decode_error(f"A map has an odd number of elements ({len(items)}).")
    result: dict[Any, Any] = {}
    for key, value in zip(items[::2], items[1::2], strict=True):
        try:
            if key in result:
                raise _decode_error(f"A map has the key {key!r} twice.")
        except TypeError:
            raise _decode_error(f"A map key of type {type(key).__name__} is not supported.") from None
        result[key] = value
    return result


def _array(width: int) -> _Body:
    def decode(buf: bytes, pos: int, end: int, depth: int) -> tuple[Any, int]:
        start, stop = _size(buf, pos, end, width)
        try:
            return _array_body(buf, start, stop, width, depth), stop
        except InsufficientData:
            raise _decode_error("An array's elements overrun its size.") from None

    return decode


def _array_body(buf: bytes, pos: int, end: int, width: int, depth: int) -> Array:
    if depth >= MAX_DEPTH:
        raise _decode_error(f"Values are nested deeper than {MAX_DEPTH} levels.")
    if pos + width + 1 > end:
        raise InsufficientData
    count = int.from_bytes(buf[pos : pos + width], "big")
    pos += width
    code = buf[pos]
    pos += 1
    descriptor = None
    if code == TypeCode.DESCRIBED:
        descriptor, pos = _decode(buf, pos, end, depth + 1)
        _check_descriptor(descriptor)
        if pos >= end:
            raise InsufficientData
        code = buf[pos]
        pos += 1
    element = _known_code(code)
    if element is TypeCode.DESCRIBED:
        raise _decode_error("An array element constructor is described twice.")
    limit = MAX_EMPTY_ELEMENTS if element in _ZERO_WIDTH else end - pos
    if count > limit:
        raise _decode_error(f"An array claims {count} elements in {end - pos} bytes.")
    decoder = _DECODERS[element]
    items = []
    for _ in range(count):
        item, pos = decoder(buf, pos, end, depth + 1)
        items.append(item)
    if pos != end:
        raise _decode_error(f"An array has {end - pos} bytes after its {count} elements.")
    return Array(CANONICAL[element], tuple(items), descriptor)


def _known_code(code: int) -> TypeCode:
    try:
        return TypeCode(code)
    except ValueError:
        raise _decode_error(f"{code:#04x} is not an AMQP format code.") from None


def _check_descriptor(descriptor: Any) -> None:
    if type(descriptor) is not ULong and not isinstance(descriptor, ULong | Symbol):
        raise _decode_error(f"A descriptor must be a ulong or a symbol, not {type(descriptor).__name__}.")


_ZERO_WIDTH: dict[TypeCode, Any] = {
    TypeCode.NULL: None,
    TypeCode.TRUE: True,
    TypeCode.FALSE: False,
    TypeCode.UINT0: UInt(0),
    TypeCode.ULONG0: ULong(0),
    TypeCode.LIST0: [],
}


def _boolean(value: int) -> bool:
    if value > 1:
        raise _decode_error(f"{value:#04x} is not a boolean (0x00 or 0x01).")
    return value == 1


def _wire(cls: type[int]) -> Callable[[int], Any]:
    """``cls`` made from a value its encoding's width already bounds: no range check, and the
    values of one byte shared (immutable) rather than made again."""
    small = [int.__new__(cls, i) for i in range(256)] if cls._min == 0 else []  # type: ignore[attr-defined]

    def make(value: int) -> Any:
        return small[value] if 0 <= value < len(small) else int.__new__(cls, value)

    return make


def _empty_list(buf: bytes, pos: int, end: int, depth: int) -> tuple[Any, int]:
    return [], pos  # a new list each time: decoded lists are the caller's


_DECODERS: dict[TypeCode, _Body] = {
    **{code: _constant(value) for code, value in _ZERO_WIDTH.items()},
    TypeCode.LIST0: _empty_list,
    TypeCode.BOOLEAN: _fixed(">B", _boolean),
    TypeCode.UBYTE: _fixed(">B", _wire(UByte)),
    TypeCode.USHORT: _fixed(">H", _wire(UShort)),
    TypeCode.UINT: _fixed(">I", _wire(UInt)),
    TypeCode.SMALLUINT: _fixed(">B", _wire(UInt)),
    TypeCode.ULONG: _fixed(">Q", _wire(ULong)),
    TypeCode.SMALLULONG: _fixed(">B", _wire(ULong)),
    TypeCode.BYTE: _fixed(">b", _wire(Byte)),
    TypeCode.SHORT: _fixed(">h", _wire(Short)),
    TypeCode.INT: _fixed(">i", _wire(Int)),
    TypeCode.SMALLINT: _fixed(">b", _wire(Int)),
    TypeCode.LONG: _fixed(">q", _wire(Long)),
    TypeCode.SMALLLONG: _fixed(">b", _wire(Long)),
    TypeCode.FLOAT: _fixed(">f", Float),
    TypeCode.DOUBLE: _fixed(">d", float),
    TypeCode.CHAR: _fixed(">I", _char),
    TypeCode.TIMESTAMP: _fixed(">q", Timestamp),
    TypeCode.DECIMAL32: _fixed(">4s", Decimal32),
    TypeCode.DECIMAL64: _fixed(">8s", Decimal64),
    TypeCode.DECIMAL128: _fixed(">16s", Decimal128),
    TypeCode.UUID: _fixed(">16s", lambda raw: uuid.UUID(bytes=raw)),
    TypeCode.VBIN8: _variable(1, bytes),
    TypeCode.VBIN32: _variable(4, bytes),
    TypeCode.STR8: _variable(1, _utf8),
    TypeCode.STR32: _variable(4, _utf8),
    TypeCode.SYM8: _variable(1, _ascii),
    TypeCode.SYM32: _variable(4, _ascii),
    TypeCode.LIST8: _compound(1, list, "list8"),
    TypeCode.LIST32: _compound(4, list, "list32"),
    TypeCode.MAP8: _compound(1, _map, "map8"),
    TypeCode.MAP32: _compound(4, _map, "map32"),
    TypeCode.ARRAY8: _array(1),
    TypeCode.ARRAY32: _array(4),
}

_SMALL_ULONG = [int.__new__(ULong, i) for i in range(256)]
_SMALL_UINT = [int.__new__(UInt, i) for i in range(256)]
_UBYTES = [int.__new__(UByte, i) for i in range(256)]

#: The decoder of each format code, indexed by the code's byte (None: not a format code).
_BY_BYTE: list[_Body | None] = [_DECODERS.get(code) for code in range(256)]  # type: ignore[call-overload]


def _decode(buf: bytes, pos: int, end: int, depth: int) -> tuple[Any, int]:
    if depth > MAX_DEPTH:
        raise _decode_error(f"Values are nested deeper than {MAX_DEPTH} levels.")
    if pos >= end:
        raise InsufficientData
    code = buf[pos]
    # The commonest constructors of performatives inline (the table has the same decoders).
    if code == 0x40:  # null: most of a performative's fields
        return None, pos + 1
    if code == 0x53 or code == 0x52:  # smallulong (descriptors), smalluint
        if pos + 2 > end:
            raise InsufficientData
        return (_SMALL_ULONG if code == 0x53 else _SMALL_UINT)[buf[pos + 1]], pos + 2
    if code == 0xA1 or code == 0xA3 or code == 0xA0:  # str8, sym8, vbin8
        if pos + 2 > end:
            raise InsufficientData
        stop = pos + 2 + buf[pos + 1]
        if stop > end:
            raise InsufficientData
        raw = buf[pos + 2 : stop]
        return (_utf8(raw) if code == 0xA1 else _ascii(raw) if code == 0xA3 else raw), stop
    if code == 0:  # described
        descriptor, pos = _decode(buf, pos + 1, end, depth + 1)
        _check_descriptor(descriptor)
        value, pos = _decode(buf, pos, end, depth + 1)
        return Described(descriptor, value), pos
    decoder = _BY_BYTE[code]
    if decoder is None:
        raise _decode_error(f"{code:#04x} is not an AMQP format code.")
    return decoder(buf, pos + 1, end, depth)


def decode_at(buf: bytes, pos: int, end: int) -> tuple[Any, int]:
    """The value at ``buf[pos]`` (read no further than ``end``) and the position after it.

    :raises InsufficientData: the value runs past ``end``.
    :raises AmqpProtocolError: the bytes are not an AMQP value (``amqp:decode-error``).
    """
    return _decode(buf, pos, end, 0)


def list_at(buf: bytes, pos: int, end: int, depth: int) -> tuple[list[Any], int] | None:
    """The elements of the list whose constructor is at ``buf[pos]``, and the position after
    it; None when the value there is not a list (the caller decodes it as any value)."""
    if pos >= end:
        raise InsufficientData
    code = buf[pos]
    if code == 0x45:
        return [], pos + 1
    if code != 0xC0 and code != 0xD0:
        return None
    width, what = (1, "list8") if code == 0xC0 else (4, "list32")
    first, stop, count = _counted(buf, pos + 1, end, width, what)
    return _elements(buf, first, stop, count, depth, what), stop


def decode_value(data: memoryview | bytes | bytearray) -> tuple[memoryview, Any]:
    """Decode one value from the start of ``data``; return the bytes after it and the value.

    :raises InsufficientData: ``data`` ends before the value does.
    :raises AmqpProtocolError: the bytes are not an AMQP value (``amqp:decode-error``).
    """
    buf = data if type(data) is bytes else bytes(data)
    value, pos = _decode(buf, 0, len(buf), 0)
    return memoryview(data)[pos:], value


#: What the composites' byte readers (:func:`~.codegen.make_reader_at`) decode with: the generic
#: decoder, strings and symbols, the shared small integers (smalluint, smallulong, ubyte), and
#: the deepest nesting.
WIRE: dict[str, Any] = {
    "_decode": _decode,
    "_utf8": _utf8,
    "_ascii": _ascii,
    "_SU": _SMALL_UINT,
    "_SL": _SMALL_ULONG,
    "_UB": _UBYTES,
    "_MAX": MAX_DEPTH,
}
