"""AMQP 1.0 messages (Part 3 §3.2): the sections of a bare or annotated message, and a
transfer's payload to and from a :class:`Message`. The header and properties sections are
composites like the performatives (:mod:`.performatives`); the others are described values
kept as they are."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias

from ...errors import AmqpProtocolError, InsufficientData
from .decoding import decode_at
from .performatives import (
    ANY,
    BINARY,
    BOOLEAN,
    STRING,
    SYMBOL,
    TIMESTAMP,
    UBYTE,
    UINT,
    Composite,
    _invalid,
    amqp_field,
    decode_composite,
    decode_composite_at,
    write_composite,
)
from .types import Described, Symbol, Timestamp, TypeCode, ULong, encode_value

__all__ = [
    "AmqpSequence",
    "AmqpValue",
    "ApplicationProperties",
    "Body",
    "Data",
    "DeliveryAnnotations",
    "Footer",
    "Header",
    "Message",
    "MessageAnnotations",
    "Properties",
    "decode_message",
    "encode_message",
]


@dataclass(frozen=True, kw_only=True)
class Header(Composite):
    descriptor_code = 0x70
    descriptor_name = "amqp:header:list"
    durable: bool = amqp_field(BOOLEAN, False)
    priority: int = amqp_field(UBYTE, 4)
    ttl: int | None = amqp_field(UINT)
    first_acquirer: bool = amqp_field(BOOLEAN, False)
    delivery_count: int = amqp_field(UINT, 0)


@dataclass(frozen=True, kw_only=True)
class Properties(Composite):
    descriptor_code = 0x73
    descriptor_name = "amqp:properties:list"
    message_id: Any = amqp_field(ANY)
    user_id: bytes | None = amqp_field(BINARY)
    to: Any = amqp_field(ANY)
    subject: str | None = amqp_field(STRING)
    reply_to: Any = amqp_field(ANY)
    correlation_id: Any = amqp_field(ANY)
    content_type: Symbol | None = amqp_field(SYMBOL)
    content_encoding: Symbol | None = amqp_field(SYMBOL)
    absolute_expiry_time: Timestamp | None = amqp_field(TIMESTAMP)
    creation_time: Timestamp | None = amqp_field(TIMESTAMP)
    group_id: str | None = amqp_field(STRING)
    group_sequence: int | None = amqp_field(UINT)
    reply_to_group_id: str | None = amqp_field(STRING)


@dataclass(frozen=True)
class _Section:
    """A described non-list section: its value is kept as it is."""

    descriptor_code: ClassVar[int]
    descriptor_name: ClassVar[str]
    value: Any


@dataclass(frozen=True)
class DeliveryAnnotations(_Section):
    descriptor_code = 0x71
    descriptor_name = "amqp:delivery-annotations:map"


@dataclass(frozen=True)
class MessageAnnotations(_Section):
    descriptor_code = 0x72
    descriptor_name = "amqp:message-annotations:map"


@dataclass(frozen=True)
class ApplicationProperties(_Section):
    descriptor_code = 0x74
    descriptor_name = "amqp:application-properties:map"


@dataclass(frozen=True)
class Data(_Section):
    descriptor_code = 0x75
    descriptor_name = "amqp:data:binary"


@dataclass(frozen=True)
class AmqpSequence(_Section):
    descriptor_code = 0x76
    descriptor_name = "amqp:amqp-sequence:list"


@dataclass(frozen=True)
class AmqpValue(_Section):
    descriptor_code = 0x77
    descriptor_name = "amqp:amqp-value:*"


@dataclass(frozen=True)
class Footer(_Section):
    descriptor_code = 0x78
    descriptor_name = "amqp:footer:map"


# Section order in a bare message (Part 3 §3.2): position, and whether it may repeat.
_SECTION_ORDER: dict[type[Any], int] = {
    Header: 0,
    DeliveryAnnotations: 1,
    MessageAnnotations: 2,
    Properties: 3,
    ApplicationProperties: 4,
    Data: 5,
    AmqpSequence: 5,
    AmqpValue: 5,
    Footer: 6,
}
_SECTIONS: dict[int | str, type[_Section]] = {
    key: cls
    for cls in (
        DeliveryAnnotations,
        MessageAnnotations,
        ApplicationProperties,
        Data,
        AmqpSequence,
        AmqpValue,
        Footer,
    )
    for key in (cls.descriptor_code, cls.descriptor_name)
}
_SECTION_TYPES: dict[type[_Section], tuple[type, ...]] = {
    DeliveryAnnotations: (dict,),
    MessageAnnotations: (dict,),
    ApplicationProperties: (dict,),
    Data: (bytes,),
    AmqpSequence: (list,),
    AmqpValue: (object,),
    Footer: (dict,),
}

Body: TypeAlias = "tuple[Data, ...] | tuple[AmqpSequence, ...] | AmqpValue | None"


@dataclass(frozen=True, kw_only=True)
class Message:
    """An annotated message: every section optional; the body is data sections, sequence
    sections, or one amqp-value."""

    header: Header | None = None
    delivery_annotations: dict[Any, Any] | None = None
    message_annotations: dict[Any, Any] | None = None
    properties: Properties | None = None
    application_properties: dict[str, Any] | None = None
    body: Body = None
    footer: dict[Any, Any] | None = None

    @property
    def data(self) -> bytes | None:
        """The concatenated data sections, or None when the body is not data."""
        if isinstance(self.body, tuple) and all(isinstance(s, Data) for s in self.body):
            return b"".join(s.value for s in self.body if isinstance(s, Data))
        return None


def encode_message(message: Message) -> bytes:
    """The bytes of a message's sections, in order (a transfer's payload)."""
    buffer = bytearray()
    if message.header is not None:
        write_composite(message.header, buffer)
    for code, value in (
        (DeliveryAnnotations.descriptor_code, message.delivery_annotations),
        (MessageAnnotations.descriptor_code, message.message_annotations),
        (Properties.descriptor_code, message.properties),
        (ApplicationProperties.descriptor_code, message.application_properties),
    ):
        if value is None:
            continue
        if isinstance(value, Composite):
            write_composite(value, buffer)
        else:
            buffer += _SECTION_PREFIX[code]
            encode_value(value, buffer)
    body = message.body
    for section in (body,) if isinstance(body, AmqpValue) else body or ():
        if type(section) is Data and type(section.value) is bytes and len(section.value) < 0x1_0000_0000:
            # the common body: one data section, written without the described value
            buffer += _SECTION_PREFIX[Data.descriptor_code]
            size = len(section.value)
            buffer += bytes((TypeCode.VBIN8, size)) if size < 256 else b"\xb0" + size.to_bytes(4, "big")
            buffer += section.value
        else:
            buffer += _SECTION_PREFIX[section.descriptor_code]
            encode_value(section.value, buffer)
    if message.footer is not None:
        buffer += _SECTION_PREFIX[Footer.descriptor_code]
        encode_value(message.footer, buffer)
    return bytes(buffer)


#: The sections that are composites, by descriptor code.
_COMPOSITE_SECTIONS = frozenset({Header.descriptor_code, Properties.descriptor_code})
#: A described section's constructor and descriptor (small ulong), by descriptor code.
_SECTION_PREFIX = {code: bytes((TypeCode.DESCRIBED, TypeCode.SMALLULONG, code)) for code in range(0x70, 0x79)}


def _section(value: Any) -> Any:
    if not isinstance(value, Described):
        raise _invalid(f"A message section must be described, not {type(value).__name__}.")
    key = int(value.descriptor) if isinstance(value.descriptor, ULong) else str(value.descriptor)
    if key in (
        Header.descriptor_code,
        Header.descriptor_name,
        Properties.descriptor_code,
        Properties.descriptor_name,
    ):
        return decode_composite(value)
    cls = _SECTIONS.get(key)
    if cls is None:
        raise _invalid(f"{value.descriptor!r} is not a message section.")
    if not isinstance(value.value, _SECTION_TYPES[cls]):
        raise _invalid(f"A {cls.__name__} section holds a {type(value.value).__name__}.")
    return cls(value.value)


def _known_section(buf: bytes, pos: int, end: int) -> tuple[Any, int] | None:
    """A data section (vbin8 or vbin32) read straight from its bytes, and application
    properties from the ones of the same bytes read before (each message gets its own map);
    with where it ends. None when the section is neither, is not complete, or has a value that
    is not immutable: it is read the general way (which says what is wrong with it)."""
    if buf[pos + 1] != 0x53:
        return None
    code, kind = buf[pos + 2], buf[pos + 3]
    if code == 0x75:  # data
        if kind == 0xA0:
            start, size = pos + 5, buf[pos + 4]
        elif kind == 0xB0 and end - pos >= 8:
            start, size = pos + 8, int.from_bytes(buf[pos + 4 : pos + 8], "big")
        else:
            return None
        stop = start + size
        return (Data(buf[start:stop]), stop) if stop <= end else None
    if code != 0x74:
        return None
    if kind == 0xC1:  # map8
        stop = pos + 5 + buf[pos + 4]
    elif kind == 0xD1 and end - pos >= 8:  # map32
        stop = pos + 8 + int.from_bytes(buf[pos + 4 : pos + 8], "big")
    else:
        return None
    if stop > end or stop - pos > _SHARED_SECTION_SIZE:
        return None
    key = buf[pos:stop]
    found = _APPLICATION_PROPERTIES.get(key)
    if found is None:
        try:
            raw, after = decode_at(key, 0, len(key))
            section = _section(raw)
        except (InsufficientData, AmqpProtocolError):
            return None
        if after != len(key) or not isinstance(section.value, dict):
            return None
        if not all(
            value is None or isinstance(value, _PLAIN) for item in section.value.items() for value in item
        ):
            return None
        if len(_APPLICATION_PROPERTIES) >= _SHARED_SECTIONS:
            _APPLICATION_PROPERTIES.clear()
        found = _APPLICATION_PROPERTIES[key] = section
    return ApplicationProperties(dict(found.value)), stop


#: Application properties of these bytes, read before (:func:`_known_section`).
_APPLICATION_PROPERTIES: dict[bytes, ApplicationProperties] = {}
_SHARED_SECTIONS = 256
#: The values application properties are shared with (immutable: strings, symbols, numbers, binaries).
_PLAIN = (str, int, float, bytes)
_SHARED_SECTION_SIZE = 1024


def decode_message(payload: bytes | memoryview) -> Message:
    """The message in a (complete) transfer payload.

    :raises AmqpProtocolError: a section is malformed, unknown, out of order or repeated, or the
        body mixes section kinds (``amqp:decode-error``).
    """
    buf = payload if type(payload) is bytes else bytes(payload)
    found: dict[str, Any] = {}
    body: list[Any] = []
    position = -1
    pos, end = 0, len(buf)
    while pos < end:
        try:
            known = _known_section(buf, pos, end) if buf[pos] == 0 and end - pos > 4 else None
            if known is not None:
                section, pos = known
            elif (
                buf[pos] == 0
                and end - pos > 3
                and buf[pos + 1] == 0x53
                and buf[pos + 2] in _COMPOSITE_SECTIONS
            ):
                # the header and properties read straight from their bytes (no described value)
                section, pos = decode_composite_at(buf, pos, end)
            else:
                raw, pos = decode_at(buf, pos, end)
                section = _section(raw)
        except InsufficientData:
            raise _invalid("A message section is truncated.") from None
        order = _SECTION_ORDER[type(section)]
        if order < position or (order == position and (order != 5 or isinstance(section, AmqpValue))):
            raise _invalid(f"The {type(section).__name__} section is out of order or repeated.")
        position = order
        if order == 5:
            if body and type(body[0]) is not type(section):
                raise _invalid("A message body mixes section kinds.")
            body.append(section)
        else:
            found[type(section).__name__] = section
    if body and isinstance(body[0], AmqpValue):
        message_body: Body = body[0]
    else:
        message_body = tuple(body) if body else None
    annotations = found.get("ApplicationProperties")
    return Message(
        header=found.get("Header"),
        delivery_annotations=_value(found.get("DeliveryAnnotations")),
        message_annotations=_value(found.get("MessageAnnotations")),
        properties=found.get("Properties"),
        application_properties=_value(annotations),
        body=message_body,
        footer=_value(found.get("Footer")),
    )


def _value(section: _Section | None) -> Any:
    return None if section is None else section.value
