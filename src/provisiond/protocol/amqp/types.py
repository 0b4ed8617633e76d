"""The AMQP 1.0 type system codec (OASIS AMQP 1.0 Part 1, "Types", §1.2-§1.6), sans-io.

Every value on the wire is a *constructor* (one format-code byte, or ``0x00`` followed by a
descriptor value and a primitive constructor for a described type) followed by its data. The
format codes fall into width classes (§1.2.2): fixed widths of 0, 1, 2, 4, 8 and 16 bytes,
variable widths with a 1- or 4-byte size (binary, string, symbol), and compound/array
widths whose size is followed by an element count.

Python representation
---------------------
Decoding keeps the AMQP type, so that re-encoding a decoded value yields the same AMQP type
(the narrowest encoding of it, which may differ from the peer's chosen width):

========================  ===============================================================
AMQP type                 Python
========================  ===============================================================
null, boolean             ``None``, ``bool``
ubyte/ushort/uint/ulong   :class:`UByte`, :class:`UShort`, :class:`UInt`, :class:`ULong`
byte/short/int/long       :class:`Byte`, :class:`Short`, :class:`Int`, :class:`Long`
                          (a plain ``int`` encodes as long)
float, double             :class:`Float`, ``float``
decimal32/64/128          :class:`Decimal32`, :class:`Decimal64`, :class:`Decimal128` (raw bytes)
char, timestamp, uuid     :class:`Char`, :class:`Timestamp` (ms since the epoch), ``uuid.UUID``
binary, string, symbol    ``bytes``, ``str``, :class:`Symbol`
list, map                 ``list`` (a ``tuple`` encodes as a list too), ``dict``
array                     :class:`Array` (one element constructor for all elements)
described                 :class:`Described` (descriptor, value)
========================  ===============================================================

Codec shape (mqttproto's): ``encode_value(value, buffer)`` appends to a ``bytearray``;
``decode_value(data) -> (rest, value)`` raises :class:`~provisiond.errors.InsufficientData`
when ``data`` ends before the value does, and :class:`~provisiond.errors.AmqpProtocolError`
(``amqp:decode-error``) when the bytes can never be a value: an unknown format code, a size
that contradicts its contents, invalid UTF-8 in a string, a non-ASCII symbol, a map with an
odd element count or duplicate keys, nesting deeper than :data:`MAX_DEPTH`, or an element count
larger than its bytes could hold (so that a hostile count cannot make the decoder allocate).
Encoding a value that has no AMQP encoding (a ``set``, a ``UInt(-1)``) is our bug and raises
:class:`~provisiond.errors.LocalProtocolError`. The decoder lives in :mod:`.decoding` (on
offsets into one ``bytes`` object); ``decode_value`` is named here too.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from ...errors import LocalProtocolError
from .decoding import MAX_DEPTH, decode_value
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
    symbol_array,
)

__all__ = [
    "MAX_DEPTH",
    "Array",
    "Byte",
    "Char",
    "Decimal32",
    "Decimal64",
    "Decimal128",
    "Described",
    "Float",
    "Int",
    "Long",
    "Short",
    "Symbol",
    "Timestamp",
    "TypeCode",
    "UByte",
    "UInt",
    "ULong",
    "UShort",
    "decode_value",
    "encode_value",
    "int_writer",
    "register_encoder",
    "write_string",
    "symbol_array",
]

# --- encoding ----------------------------------------------------------------------------------


def _pack(buffer: bytearray, code: TypeCode, fmt: str, value: Any) -> None:
    buffer.append(code)
    try:
        buffer += struct.pack(fmt, value)
    except (struct.error, OverflowError) as exc:
        raise LocalProtocolError(f"{value!r} cannot be encoded as {code.name}: {exc}") from None


def _encode_unsigned(buffer: bytearray, value: int, zero: TypeCode, small: TypeCode, wide: TypeCode) -> None:
    if value == 0:
        buffer.append(zero)
    elif value < 256:
        buffer += bytes((small, value))
    else:
        _pack(buffer, wide, ">I" if wide is TypeCode.UINT else ">Q", value)


def _encode_signed(buffer: bytearray, value: int, small: TypeCode, wide: TypeCode) -> None:
    if -128 <= value <= 127:
        _pack(buffer, small, ">b", value)
    else:
        _pack(buffer, wide, ">i" if wide is TypeCode.INT else ">q", value)


def _encode_variable(buffer: bytearray, raw: bytes, small: TypeCode, wide: TypeCode) -> None:
    if len(raw) < 256:
        buffer += bytes((small, len(raw)))
    else:
        _pack(buffer, wide, ">I", len(raw))
    buffer += raw


def _encode_compound(
    buffer: bytearray, items: Iterable[Any], count: int, small: TypeCode, wide: TypeCode
) -> None:
    body = bytearray()
    for item in items:
        encode_value(item, body)
    if len(body) < 255 and count < 256:
        buffer += bytes((small, len(body) + 1, count))
    else:
        buffer.append(wide)
        buffer += struct.pack(">II", len(body) + 4, count)
    buffer += body


def encode_value(value: Any, buffer: bytearray) -> None:
    """Append the narrowest encoding of ``value`` (see the module docstring for the types).

    :raises LocalProtocolError: ``value`` has no AMQP encoding.
    """
    encoder = _ENCODERS.get(type(value))
    if encoder is None:
        encoder = _encoder_of(value)
    encoder(value, buffer)


def _encode_null(value: None, buffer: bytearray) -> None:
    buffer.append(TypeCode.NULL)


def _encode_bool(value: bool, buffer: bytearray) -> None:
    buffer.append(TypeCode.TRUE if value else TypeCode.FALSE)


def _encode_float(value: float, buffer: bytearray) -> None:
    _pack(
        buffer,
        TypeCode.FLOAT if isinstance(value, Float) else TypeCode.DOUBLE,
        ">f" if isinstance(value, Float) else ">d",
        value,
    )


def _encode_symbol(value: str, buffer: bytearray) -> None:
    _encode_variable(buffer, value.encode("ascii"), TypeCode.SYM8, TypeCode.SYM32)


def _encode_char(value: str, buffer: bytearray) -> None:
    _pack(buffer, TypeCode.CHAR, ">I", ord(value))


def _encode_string(value: str, buffer: bytearray) -> None:
    _encode_variable(buffer, _to_utf8(value), TypeCode.STR8, TypeCode.STR32)


def write_string(value: str, buffer: bytearray) -> None:
    """Append ``value`` as an AMQP string (a ``str`` subclass as its text)."""
    _encode_variable(buffer, _to_utf8(value), TypeCode.STR8, TypeCode.STR32)


def _encode_decimal(value: bytes, buffer: bytearray) -> None:
    buffer.append({4: TypeCode.DECIMAL32, 8: TypeCode.DECIMAL64, 16: TypeCode.DECIMAL128}[len(value)])
    buffer += value


def _encode_binary(value: bytes | bytearray | memoryview, buffer: bytearray) -> None:
    _encode_variable(buffer, bytes(value), TypeCode.VBIN8, TypeCode.VBIN32)


def _encode_uuid(value: uuid.UUID, buffer: bytearray) -> None:
    buffer.append(TypeCode.UUID)
    buffer += value.bytes


def _encode_described(value: Described, buffer: bytearray) -> None:
    buffer.append(TypeCode.DESCRIBED)
    encode_value(value.descriptor, buffer)
    encode_value(value.value, buffer)


def _encode_list(value: list[Any] | tuple[Any, ...], buffer: bytearray) -> None:
    if not value:
        buffer.append(TypeCode.LIST0)
    else:
        _encode_compound(buffer, value, len(value), TypeCode.LIST8, TypeCode.LIST32)


def _encode_map(value: dict[Any, Any], buffer: bytearray) -> None:
    flat = [x for pair in value.items() for x in pair]
    _encode_compound(buffer, flat, len(flat), TypeCode.MAP8, TypeCode.MAP32)


def _encoder_of(value: Any) -> Callable[[Any, bytearray], None]:
    """The encoder of a value whose exact type is not in :data:`_ENCODERS` (a subclass)."""
    if value is None:
        return _encode_null
    if isinstance(value, bool):
        return _encode_bool
    if isinstance(value, int):
        return _encode_int
    if isinstance(value, float):
        return _encode_float
    if isinstance(value, str):
        return (
            _encode_symbol
            if isinstance(value, Symbol)
            else _encode_char
            if isinstance(value, Char)
            else _encode_string
        )
    if isinstance(value, Decimal32 | Decimal64 | Decimal128):
        return _encode_decimal
    if isinstance(value, bytes | bytearray | memoryview):
        return _encode_binary
    for kind, encoder in (
        (uuid.UUID, _encode_uuid),
        (Described, _encode_described),
        (list | tuple, _encode_list),
        (dict, _encode_map),
        (Array, _encode_array),
    ):
        if isinstance(value, kind):
            return encoder
    raise LocalProtocolError(f"A {type(value).__name__} has no AMQP encoding.")


def _to_utf8(value: str) -> bytes:
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(f"The string cannot be encoded as UTF-8: {exc}") from None


_INT_ENCODERS: dict[type, Callable[[bytearray, int], None]] = {
    UByte: lambda b, v: _pack(b, TypeCode.UBYTE, ">B", v),
    UShort: lambda b, v: _pack(b, TypeCode.USHORT, ">H", v),
    UInt: lambda b, v: _encode_unsigned(b, v, TypeCode.UINT0, TypeCode.SMALLUINT, TypeCode.UINT),
    ULong: lambda b, v: _encode_unsigned(b, v, TypeCode.ULONG0, TypeCode.SMALLULONG, TypeCode.ULONG),
    Byte: lambda b, v: _pack(b, TypeCode.BYTE, ">b", v),
    Short: lambda b, v: _pack(b, TypeCode.SHORT, ">h", v),
    Int: lambda b, v: _encode_signed(b, v, TypeCode.SMALLINT, TypeCode.INT),
    Long: lambda b, v: _encode_signed(b, v, TypeCode.SMALLLONG, TypeCode.LONG),
    Timestamp: lambda b, v: _pack(b, TypeCode.TIMESTAMP, ">q", v),
    int: lambda b, v: _encode_signed(b, v, TypeCode.SMALLLONG, TypeCode.LONG),
}


def _encode_int(value: int, buffer: bytearray) -> None:
    encoder = _INT_ENCODERS.get(type(value))
    if encoder is None:
        raise LocalProtocolError(f"A {type(value).__name__} has no AMQP encoding.")
    encoder(buffer, value)


def int_writer(cls: type[int]) -> Callable[[Any, bytearray], None]:
    """An encoder of any ``int`` as the AMQP integer type ``cls`` (:class:`UInt`...), range
    checked as ``cls(value)`` would be but without making one: how the performatives' module
    writes the plain ints of its fields.

    :raises LocalProtocolError: (from the encoder) the value is out of ``cls``'s range.
    """
    encode = _INT_ENCODERS[cls]
    low, high = cls._min, cls._max  # type: ignore[attr-defined]

    def write(value: Any, buffer: bytearray) -> None:
        if not low <= value <= high:
            raise LocalProtocolError(f"{value!r} is out of range for an AMQP {cls.__name__.lower()}")
        encode(buffer, value)

    return write


def _int_encoder(encode: Callable[[bytearray, int], None]) -> Callable[[Any, bytearray], None]:
    return lambda value, buffer: encode(buffer, value)


# Array element encodings: the fixed-width constructor of each element type, or for variable
# and compound types the (narrow, wide) pair; the narrow one is used when every element fits.
_ARRAY_FIXED: dict[TypeCode, tuple[TypeCode, str | None]] = {
    TypeCode.NULL: (TypeCode.NULL, None),
    TypeCode.BOOLEAN: (TypeCode.BOOLEAN, ">?"),
    TypeCode.UBYTE: (TypeCode.UBYTE, ">B"),
    TypeCode.USHORT: (TypeCode.USHORT, ">H"),
    TypeCode.UINT: (TypeCode.UINT, ">I"),
    TypeCode.ULONG: (TypeCode.ULONG, ">Q"),
    TypeCode.BYTE: (TypeCode.BYTE, ">b"),
    TypeCode.SHORT: (TypeCode.SHORT, ">h"),
    TypeCode.INT: (TypeCode.INT, ">i"),
    TypeCode.LONG: (TypeCode.LONG, ">q"),
    TypeCode.FLOAT: (TypeCode.FLOAT, ">f"),
    TypeCode.DOUBLE: (TypeCode.DOUBLE, ">d"),
    TypeCode.TIMESTAMP: (TypeCode.TIMESTAMP, ">q"),
    TypeCode.CHAR: (TypeCode.CHAR, None),
    TypeCode.DECIMAL32: (TypeCode.DECIMAL32, None),
    TypeCode.DECIMAL64: (TypeCode.DECIMAL64, None),
    TypeCode.DECIMAL128: (TypeCode.DECIMAL128, None),
    TypeCode.UUID: (TypeCode.UUID, None),
}
_ARRAY_VARIABLE: dict[TypeCode, tuple[TypeCode, TypeCode]] = {
    TypeCode.VBIN32: (TypeCode.VBIN8, TypeCode.VBIN32),
    TypeCode.STR32: (TypeCode.STR8, TypeCode.STR32),
    TypeCode.SYM32: (TypeCode.SYM8, TypeCode.SYM32),
    TypeCode.LIST32: (TypeCode.LIST8, TypeCode.LIST32),
    TypeCode.MAP32: (TypeCode.MAP8, TypeCode.MAP32),
    TypeCode.ARRAY32: (TypeCode.ARRAY8, TypeCode.ARRAY32),
}


def _element_bodies(array: Array) -> tuple[TypeCode, list[bytes]]:
    """The element constructor and each element's encoding without a constructor."""
    element = array.element
    if element in _ARRAY_FIXED:
        code, fmt = _ARRAY_FIXED[element]
        bodies = []
        for item in array.items:
            encoded = bytearray()
            encode_value(item, encoded)
            if fmt is None:  # the full encoding already uses this constructor
                if code is TypeCode.NULL and item is not None or encoded[0] != code:
                    raise LocalProtocolError(f"{item!r} is not an element of a {element.name} array")
                bodies.append(bytes(encoded[1:]))
            else:
                if _canonical_of(encoded[0]) is not element:
                    raise LocalProtocolError(f"{item!r} is not an element of a {element.name} array")
                try:
                    bodies.append(struct.pack(fmt, item))
                except struct.error as exc:
                    raise LocalProtocolError(f"{item!r} does not fit a {element.name}: {exc}") from None
        return code, bodies
    narrow, wide = _ARRAY_VARIABLE[element]
    encodings = []
    for item in array.items:
        encoded = bytearray()
        encode_value(item, encoded)
        if _canonical_of(encoded[0]) is not element:
            raise LocalProtocolError(f"{item!r} is not an element of a {element.name} array")
        encodings.append(_widen(encoded))
    # Every element re-encoded at the wide width first; narrowed when all of them fit.
    small = all(_fits_narrow(e, element) for e in encodings)
    if small:
        return narrow, [_narrow(e, element) for e in encodings]
    return wide, [bytes(e[1:]) for e in encodings]


def _canonical_of(code: int) -> TypeCode | None:
    try:
        return CANONICAL[TypeCode(code)]
    except (ValueError, KeyError):
        return None


def _widen(encoded: bytearray) -> bytes:
    """Re-encode a variable or compound value at its 32-bit width (constructor included)."""
    code = TypeCode(encoded[0])
    if code in (
        TypeCode.VBIN32,
        TypeCode.STR32,
        TypeCode.SYM32,
        TypeCode.LIST32,
        TypeCode.MAP32,
        TypeCode.ARRAY32,
    ):
        return bytes(encoded)
    if code is TypeCode.LIST0:
        return bytes((TypeCode.LIST32,)) + struct.pack(">II", 4, 0)
    wide = CANONICAL[code]
    if code in (TypeCode.VBIN8, TypeCode.STR8, TypeCode.SYM8):
        return bytes((wide,)) + struct.pack(">I", encoded[1]) + bytes(encoded[2:])
    size, count = encoded[1], encoded[2]  # list8, map8, array8
    return bytes((wide,)) + struct.pack(">II", size + 3, count) + bytes(encoded[3:])


def _fits_narrow(wide: bytes, element: TypeCode) -> bool:
    size = int.from_bytes(wide[1:5], "big")
    if element in (TypeCode.VBIN32, TypeCode.STR32, TypeCode.SYM32):
        return size < 256
    return size - 3 < 256 and int.from_bytes(wide[5:9], "big") < 256


def _narrow(wide: bytes, element: TypeCode) -> bytes:
    size = int.from_bytes(wide[1:5], "big")
    if element in (TypeCode.VBIN32, TypeCode.STR32, TypeCode.SYM32):
        return bytes((size,)) + wide[5:]
    return bytes((size - 3, int.from_bytes(wide[5:9], "big"))) + wide[9:]


def _encode_array(array: Array, buffer: bytearray) -> None:
    code, bodies = _element_bodies(array)
    constructor = bytearray()
    if array.descriptor is not None:
        constructor.append(TypeCode.DESCRIBED)
        encode_value(array.descriptor, constructor)
    constructor.append(code)
    payload = b"".join(bodies)
    count = len(bodies)
    if len(constructor) + len(payload) + 1 < 256 and count < 256:
        buffer += bytes((TypeCode.ARRAY8, len(constructor) + len(payload) + 1, count))
    else:
        buffer.append(TypeCode.ARRAY32)
        buffer += struct.pack(">II", len(constructor) + len(payload) + 4, count)
    buffer += constructor
    buffer += payload


#: The encoder of each exact type :func:`encode_value` meets; a subclass goes through
#: :func:`_encoder_of`.
_ENCODERS: dict[type, Callable[[Any, bytearray], None]] = {
    type(None): _encode_null,
    bool: _encode_bool,
    float: _encode_float,
    Float: _encode_float,
    str: _encode_string,
    Symbol: _encode_symbol,
    Char: _encode_char,
    bytes: _encode_binary,
    bytearray: _encode_binary,
    memoryview: _encode_binary,
    Decimal32: _encode_decimal,
    Decimal64: _encode_decimal,
    Decimal128: _encode_decimal,
    uuid.UUID: _encode_uuid,
    Described: _encode_described,
    list: _encode_list,
    tuple: _encode_list,
    dict: _encode_map,
    Array: _encode_array,
    **{kind: _int_encoder(encode) for kind, encode in _INT_ENCODERS.items()},
}


def register_encoder(cls: type, encoder: Callable[[Any, bytearray], None]) -> None:
    """Let :func:`encode_value` encode instances of ``cls`` (exactly that class) with
    ``encoder(value, buffer)``: how the performatives' module has its composites (described
    lists) encoded where they are field values, without building the described list first."""
    _ENCODERS[cls] = encoder
