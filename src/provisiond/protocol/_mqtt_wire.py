"""The MQTT 3.1.1 wire grammar's primitives (OASIS MQTT 3.1.1 §1.5, §2.2.3), in the codec shape
shared by the project's codecs: ``encode_x(value, buffer)`` appends to a ``bytearray``;
``decode_x(data) -> (rest, value)`` raises :class:`~provisiond.errors.InsufficientData` when
``data`` ends inside the value and :class:`~provisiond.errors.RemoteProtocolError` when the
bytes can never be one."""

from __future__ import annotations

from ..errors import InsufficientData, LocalProtocolError, RemoteProtocolError

__all__ = [
    "MAX_REMAINING_LENGTH",
    "decode_binary",
    "decode_string",
    "decode_uint8",
    "decode_uint16",
    "decode_varint",
    "encode_binary",
    "encode_string",
    "encode_uint16",
    "encode_varint",
]

MAX_REMAINING_LENGTH = 268_435_455


def decode_uint8(data: memoryview) -> tuple[memoryview, int]:
    if len(data) < 1:
        raise InsufficientData
    return data[1:], data[0]


def decode_uint16(data: memoryview) -> tuple[memoryview, int]:
    if len(data) < 2:
        raise InsufficientData
    return data[2:], data[0] << 8 | data[1]


def encode_uint16(value: int, buffer: bytearray) -> None:
    buffer += value.to_bytes(2, "big")


def decode_binary(data: memoryview) -> tuple[memoryview, bytes]:
    """Two-byte length, then that many bytes (§1.5.3, password and will message)."""
    data, length = decode_uint16(data)
    if len(data) < length:
        raise InsufficientData
    return data[length:], bytes(data[:length])


def encode_binary(value: bytes, buffer: bytearray) -> None:
    encode_uint16(len(value), buffer)
    buffer += value


def decode_string(data: memoryview) -> tuple[memoryview, str]:
    """A UTF-8 string: well-formed, without U+0000 (§1.5.3, MQTT-1.5.3-1 and -2)."""
    data, raw = decode_binary(data)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError(f"A string is not well-formed UTF-8 ({exc.reason}).") from None
    if "\x00" in text:
        raise RemoteProtocolError("A string contains U+0000, which MQTT forbids.")
    return data, text


def encode_string(value: str, buffer: bytearray) -> None:
    encode_binary(value.encode("utf-8"), buffer)


def decode_varint(data: memoryview) -> tuple[memoryview, int]:
    """The remaining length (§2.2.3): 1 to 4 bytes, 7 bits each, least significant first, in its
    shortest form (a longer one is refused, so that the grammar stays canonical)."""
    value = 0
    for index in range(4):
        if index >= len(data):
            raise InsufficientData
        byte = data[index]
        value |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            if byte == 0 and index > 0:
                raise RemoteProtocolError("The remaining length is not in its shortest encoding.")
            return data[index + 1 :], value
    raise RemoteProtocolError("The remaining length takes more than 4 bytes.")


def encode_varint(value: int, buffer: bytearray) -> None:
    if not 0 <= value <= MAX_REMAINING_LENGTH:
        raise LocalProtocolError(f"A remaining length of {value} bytes is more than MQTT can carry.")
    while True:
        byte, value = value & 0x7F, value >> 7
        buffer.append(byte | 0x80 if value else byte)
        if not value:
            return
