"""The values of the AMQP 1.0 type system (Part 1 §1.6) as Python types, and the format codes;
:mod:`.types` encodes and decodes them (see its docstring for the mapping)."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from ...errors import LocalProtocolError

__all__ = [
    "CANONICAL",
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
    "symbol_array",
]


class TypeCode(enum.IntEnum):
    """The primitive format codes (Part 1 §1.6)."""

    DESCRIBED = 0x00
    NULL = 0x40
    TRUE = 0x41
    FALSE = 0x42
    UINT0 = 0x43
    ULONG0 = 0x44
    LIST0 = 0x45
    UBYTE = 0x50
    BYTE = 0x51
    SMALLUINT = 0x52
    SMALLULONG = 0x53
    SMALLINT = 0x54
    SMALLLONG = 0x55
    BOOLEAN = 0x56
    USHORT = 0x60
    SHORT = 0x61
    UINT = 0x70
    INT = 0x71
    FLOAT = 0x72
    CHAR = 0x73
    DECIMAL32 = 0x74
    ULONG = 0x80
    LONG = 0x81
    DOUBLE = 0x82
    TIMESTAMP = 0x83
    DECIMAL64 = 0x84
    DECIMAL128 = 0x94
    UUID = 0x98
    VBIN8 = 0xA0
    STR8 = 0xA1
    SYM8 = 0xA3
    VBIN32 = 0xB0
    STR32 = 0xB1
    SYM32 = 0xB3
    LIST8 = 0xC0
    MAP8 = 0xC1
    LIST32 = 0xD0
    MAP32 = 0xD1
    ARRAY8 = 0xE0
    ARRAY32 = 0xF0


# --- typed values ------------------------------------------------------------------------------


class _RangedInt(int):
    _min: ClassVar[int]
    _max: ClassVar[int]

    def __new__(cls, value: int = 0) -> Any:
        if not cls._min <= int(value) <= cls._max:
            raise LocalProtocolError(f"{value!r} is out of range for an AMQP {cls.__name__.lower()}")
        return super().__new__(cls, value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({int(self)})"


class UByte(_RangedInt):
    _min, _max = 0, 0xFF


class UShort(_RangedInt):
    _min, _max = 0, 0xFFFF


class UInt(_RangedInt):
    _min, _max = 0, 0xFFFF_FFFF


class ULong(_RangedInt):
    _min, _max = 0, 0xFFFF_FFFF_FFFF_FFFF


class Byte(_RangedInt):
    _min, _max = -0x80, 0x7F


class Short(_RangedInt):
    _min, _max = -0x8000, 0x7FFF


class Int(_RangedInt):
    _min, _max = -0x8000_0000, 0x7FFF_FFFF


class Long(_RangedInt):
    _min, _max = -0x8000_0000_0000_0000, 0x7FFF_FFFF_FFFF_FFFF


class Timestamp(Long):
    """Milliseconds since the Unix epoch (signed 64-bit)."""


class Float(float):
    """An IEEE 754 single-precision float (a plain ``float`` is a double)."""

    def __repr__(self) -> str:
        return f"Float({float(self)!r})"


class Symbol(str):
    """A symbolic value from a constrained domain: ASCII only (Part 1 §1.6.21)."""

    def __new__(cls, value: str = "") -> Symbol:
        if not value.isascii():
            raise LocalProtocolError(f"An AMQP symbol is ASCII only, not {value[:40]!r}")
        return super().__new__(cls, value)

    def __repr__(self) -> str:
        return f"Symbol({str(self)!r})"


class Char(str):
    """A single Unicode code point (UTF-32BE on the wire)."""

    def __new__(cls, value: str) -> Char:
        if len(value) != 1:
            raise LocalProtocolError(f"An AMQP char is one code point, not {value[:40]!r}")
        return super().__new__(cls, value)


class _Decimal(bytes):
    _width: ClassVar[int]

    def __new__(cls, value: bytes) -> Any:
        if len(value) != cls._width:
            raise LocalProtocolError(f"An AMQP {cls.__name__.lower()} is {cls._width} bytes")
        return super().__new__(cls, value)


class Decimal32(_Decimal):
    """IEEE 754 decimal32, kept as its raw bytes."""

    _width = 4


class Decimal64(_Decimal):
    """IEEE 754 decimal64, kept as its raw bytes."""

    _width = 8


class Decimal128(_Decimal):
    """IEEE 754 decimal128, kept as its raw bytes."""

    _width = 16


@dataclass(frozen=True, slots=True)
class Described:
    """A described value (Part 1 §1.5): the descriptor (a ulong code or a symbol) says how to
    interpret the value."""

    descriptor: ULong | Symbol
    value: Any

    def __post_init__(self) -> None:
        if not isinstance(self.descriptor, ULong | Symbol):
            raise LocalProtocolError(f"A descriptor is a ulong or a symbol, not {self.descriptor!r}")


@dataclass(frozen=True, slots=True)
class Array:
    """An AMQP array: elements of one type, sharing one constructor (Part 1 §1.2.4).

    ``element`` is the element type as its widest format code (``SYM32``, ``UINT``, ``LIST32``,
    ``BOOLEAN``...); the encoder picks the narrowest width that fits every element. A described
    element type has a ``descriptor``.
    """

    element: TypeCode
    items: tuple[Any, ...] = ()
    descriptor: ULong | Symbol | None = None

    def __post_init__(self) -> None:
        if self.element not in CANONICAL.values():
            raise LocalProtocolError(f"{self.element!r} is not an array element type")


def symbol_array(names: Iterable[str]) -> Array:
    """An array of symbols (how ``multiple`` symbol fields are usually sent)."""
    return Array(TypeCode.SYM32, tuple(Symbol(n) for n in names))


#: Each format code's canonical (widest) code, which identifies the AMQP type.
CANONICAL: dict[TypeCode, TypeCode] = {
    TypeCode.NULL: TypeCode.NULL,
    TypeCode.TRUE: TypeCode.BOOLEAN,
    TypeCode.FALSE: TypeCode.BOOLEAN,
    TypeCode.BOOLEAN: TypeCode.BOOLEAN,
    TypeCode.UBYTE: TypeCode.UBYTE,
    TypeCode.USHORT: TypeCode.USHORT,
    TypeCode.UINT0: TypeCode.UINT,
    TypeCode.SMALLUINT: TypeCode.UINT,
    TypeCode.UINT: TypeCode.UINT,
    TypeCode.ULONG0: TypeCode.ULONG,
    TypeCode.SMALLULONG: TypeCode.ULONG,
    TypeCode.ULONG: TypeCode.ULONG,
    TypeCode.BYTE: TypeCode.BYTE,
    TypeCode.SHORT: TypeCode.SHORT,
    TypeCode.SMALLINT: TypeCode.INT,
    TypeCode.INT: TypeCode.INT,
    TypeCode.SMALLLONG: TypeCode.LONG,
    TypeCode.LONG: TypeCode.LONG,
    TypeCode.FLOAT: TypeCode.FLOAT,
    TypeCode.DOUBLE: TypeCode.DOUBLE,
    TypeCode.DECIMAL32: TypeCode.DECIMAL32,
    TypeCode.DECIMAL64: TypeCode.DECIMAL64,
    TypeCode.DECIMAL128: TypeCode.DECIMAL128,
    TypeCode.CHAR: TypeCode.CHAR,
    TypeCode.TIMESTAMP: TypeCode.TIMESTAMP,
    TypeCode.UUID: TypeCode.UUID,
    TypeCode.VBIN8: TypeCode.VBIN32,
    TypeCode.VBIN32: TypeCode.VBIN32,
    TypeCode.STR8: TypeCode.STR32,
    TypeCode.STR32: TypeCode.STR32,
    TypeCode.SYM8: TypeCode.SYM32,
    TypeCode.SYM32: TypeCode.SYM32,
    TypeCode.LIST0: TypeCode.LIST32,
    TypeCode.LIST8: TypeCode.LIST32,
    TypeCode.LIST32: TypeCode.LIST32,
    TypeCode.MAP8: TypeCode.MAP32,
    TypeCode.MAP32: TypeCode.MAP32,
    TypeCode.ARRAY8: TypeCode.ARRAY32,
    TypeCode.ARRAY32: TypeCode.ARRAY32,
}
