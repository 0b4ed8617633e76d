"""MQTT 3.1.1 control packets and their codec (OASIS MQTT 3.1.1 §1-§3), shared by the service
endpoint and the device client. No I/O.

Every packet is a frozen dataclass that validates itself in its constructor, so an invalid
packet cannot exist (h11's events). Constructing one wrongly is our bug and raises
:class:`~provisiond.errors.LocalProtocolError`; decoding bytes that break the grammar raises
:class:`~provisiond.errors.RemoteProtocolError`; input that ends inside a packet raises
:class:`~provisiond.errors.InsufficientData` (mqttproto's codec shape)::

    encode(buffer: bytearray) -> None
    decode_x(data: memoryview) -> tuple[memoryview, value]      # the rest, and the value

:func:`decode_packet` reads one packet: the fixed header, the remaining length (checked against
the maximum packet size as soon as it is known, so a hostile peer cannot make us buffer more),
then the body, which its class decodes and must consume exactly. The grammar is canonical (the
remaining length in its shortest form, reserved bits zero, DUP only with QoS > 0), so a packet
that decodes re-encodes to the same bytes. Only the ten packet types DPS needs are supported;
PUBREC/PUBREL/PUBCOMP (QoS 2 flows) are refused as unsupported.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar, TypeVar

from ..errors import InsufficientData, LocalProtocolError, RemoteProtocolError
from ._mqtt_wire import (
    decode_binary,
    decode_string,
    decode_uint8,
    decode_uint16,
    decode_varint,
    encode_binary,
    encode_string,
    encode_uint16,
    encode_varint,
)

__all__ = [
    "DEFAULT_MAX_PACKET_SIZE",
    "PACKET_CLASSES",
    "PROTOCOL_LEVEL",
    "PROTOCOL_NAME",
    "Connack",
    "Connect",
    "ConnectReturnCode",
    "Disconnect",
    "Packet",
    "PacketType",
    "Pingreq",
    "Pingresp",
    "Puback",
    "Publish",
    "QoS",
    "Suback",
    "SubackReturnCode",
    "Subscribe",
    "Subscription",
    "Unsuback",
    "Unsubscribe",
    "Will",
    "decode_packet",
    "encode_packet",
]

PROTOCOL_NAME = "MQTT"
#: The protocol level of MQTT 3.1.1 in CONNECT.
PROTOCOL_LEVEL = 4
#: Largest whole packet (fixed header included) :func:`decode_packet` accepts by default.
DEFAULT_MAX_PACKET_SIZE = 256 * 1024
_MAX_UINT16 = 0xFFFF

_E = TypeVar("_E", bound=enum.IntEnum)


class PacketType(enum.IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14


class QoS(enum.IntEnum):
    AT_MOST_ONCE = 0
    AT_LEAST_ONCE = 1
    EXACTLY_ONCE = 2


class ConnectReturnCode(enum.IntEnum):
    """CONNACK return codes (§3.2.2.3)."""

    ACCEPTED = 0
    UNACCEPTABLE_PROTOCOL_VERSION = 1
    IDENTIFIER_REJECTED = 2
    SERVER_UNAVAILABLE = 3
    BAD_USERNAME_OR_PASSWORD = 4
    NOT_AUTHORIZED = 5


class SubackReturnCode(enum.IntEnum):
    """SUBACK return codes (§3.9.3): the granted QoS, or failure."""

    GRANTED_QOS_0 = 0x00
    GRANTED_QOS_1 = 0x01
    GRANTED_QOS_2 = 0x02
    FAILURE = 0x80


# --- validation helpers (constructors raise LocalProtocolError) ------------------------------------


def _check_string(value: str, what: str) -> None:
    if "\x00" in value:
        raise LocalProtocolError(f"The {what} contains U+0000, which MQTT forbids.")
    if len(value) > _MAX_UINT16 // 4 and len(value.encode("utf-8")) > _MAX_UINT16:
        raise LocalProtocolError(f"The {what} is longer than 65,535 bytes.")


def _check_packet_id(packet_id: int, what: str) -> None:
    if not 0 < packet_id <= _MAX_UINT16:
        raise LocalProtocolError(f"{packet_id!r} is not a packet identifier ({what} needs 1 to 65535).")


def _check_topic_name(topic: str) -> None:
    if not topic:
        raise LocalProtocolError("A topic name must not be empty.")
    if "+" in topic or "#" in topic:
        raise LocalProtocolError(f"A topic name must not contain wildcards: {topic[:100]!r}.")
    _check_string(topic, "topic name")


def _check_topic_filter(topic_filter: str) -> None:
    if not topic_filter:
        raise LocalProtocolError("A topic filter must not be empty.")
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise LocalProtocolError(f"'#' must be a whole, last level: {topic_filter[:100]!r}.")
        if "+" in level and level != "+":
            raise LocalProtocolError(f"'+' must be a whole level: {topic_filter[:100]!r}.")
    _check_string(topic_filter, "topic filter")


# --- packets ---------------------------------------------------------------------------------------

#: Packet type -> class, filled by :meth:`Packet.__init_subclass__`.
PACKET_CLASSES: dict[PacketType, type[Packet]] = {}

#: Flags of the fixed header that every packet type but PUBLISH must carry (§2.2.2).
_FIXED_FLAGS = {PacketType.SUBSCRIBE: 0b0010, PacketType.UNSUBSCRIBE: 0b0010, PacketType.PUBREL: 0b0010}


@dataclass(frozen=True, slots=True, kw_only=True)
class Packet:
    """Base of the control packets."""

    packet_type: ClassVar[PacketType]

    def __init_subclass__(cls) -> None:
        # No super() call: slots dataclasses are rebuilt, so the zero-argument form breaks
        # here, and object's hook does nothing anyway.
        if "packet_type" in cls.__dict__:
            PACKET_CLASSES[cls.packet_type] = cls  # the slots class replaces the first one

    def encode(self, buffer: bytearray) -> None:
        """Append the whole packet (fixed header, remaining length, body) to ``buffer``."""
        body = bytearray()
        self._encode_body(body)
        buffer.append(self.packet_type << 4 | self._flags())
        encode_varint(len(body), buffer)
        buffer += body

    def _flags(self) -> int:
        return _FIXED_FLAGS.get(self.packet_type, 0)

    def _encode_body(self, buffer: bytearray) -> None:
        return None

    @classmethod
    def decode_body(cls, flags: int, body: memoryview) -> Packet:
        """The packet from its complete body; the body must be consumed exactly."""
        if body:
            raise RemoteProtocolError(
                f"A {cls.packet_type.name} packet has a {len(body)}-byte body; it has none."
            )
        return cls()


@dataclass(frozen=True, slots=True, kw_only=True)
class Will:
    """The will message of a CONNECT (accepted and ignored by the DPS endpoint)."""

    topic: str
    message: bytes = b""
    qos: QoS = QoS.AT_MOST_ONCE
    retain: bool = False

    def __post_init__(self) -> None:
        _check_topic_name(self.topic)
        if len(self.message) > _MAX_UINT16:
            raise LocalProtocolError("A will message is longer than 65,535 bytes.")


@dataclass(frozen=True, slots=True, kw_only=True)
class Connect(Packet):
    """CONNECT (§3.1). For a protocol level other than 4 only ``protocol_name`` and
    ``protocol_level`` are decoded (MQTT 5 lays out the rest differently); a 3.1.1 server
    answers such a CONNECT with return code 1 without reading further."""

    packet_type = PacketType.CONNECT
    client_id: str
    username: str | None = None
    password: bytes | None = None
    clean_session: bool = True
    keep_alive: int = 60
    will: Will | None = None
    protocol_name: str = PROTOCOL_NAME
    protocol_level: int = PROTOCOL_LEVEL

    def __post_init__(self) -> None:
        _check_string(self.client_id, "client identifier")
        _check_string(self.protocol_name, "protocol name")
        if self.username is not None:
            _check_string(self.username, "user name")
        if self.password is not None:
            if self.username is None:
                raise LocalProtocolError("MQTT 3.1.1 sends a password only with a user name.")
            if len(self.password) > _MAX_UINT16:
                raise LocalProtocolError("The password is longer than 65,535 bytes.")
        if not 0 <= self.keep_alive <= _MAX_UINT16:
            raise LocalProtocolError(f"A keep-alive of {self.keep_alive!r} s is not 0 to 65535.")
        if not 0 <= self.protocol_level <= 0xFF:
            raise LocalProtocolError(f"{self.protocol_level!r} is not a protocol level.")

    @property
    def is_supported_version(self) -> bool:
        return self.protocol_name == PROTOCOL_NAME and self.protocol_level == PROTOCOL_LEVEL

    def _encode_body(self, buffer: bytearray) -> None:
        encode_string(self.protocol_name, buffer)
        buffer.append(self.protocol_level)
        flags = 0x02 if self.clean_session else 0
        if self.will is not None:
            flags |= 0x04 | self.will.qos << 3 | (0x20 if self.will.retain else 0)
        if self.password is not None:
            flags |= 0x40
        if self.username is not None:
            flags |= 0x80
        buffer.append(flags)
        encode_uint16(self.keep_alive, buffer)
        encode_string(self.client_id, buffer)
        if self.will is not None:
            encode_string(self.will.topic, buffer)
            encode_binary(self.will.message, buffer)
        if self.username is not None:
            encode_string(self.username, buffer)
        if self.password is not None:
            encode_binary(self.password, buffer)

    @classmethod
    def decode_body(cls, flags: int, body: memoryview) -> Connect:
        body, name = decode_string(body)
        if name not in (PROTOCOL_NAME, "MQIsdp"):
            raise RemoteProtocolError(f"Not an MQTT CONNECT: the protocol name is {name[:20]!r}.")
        body, level = decode_uint8(body)
        if name != PROTOCOL_NAME or level != PROTOCOL_LEVEL:
            return cls(client_id="", protocol_name=name, protocol_level=level)
        body, connect_flags = decode_uint8(body)
        if connect_flags & 0x01:
            raise RemoteProtocolError("The reserved CONNECT flag is set.")
        has_will = bool(connect_flags & 0x04)
        will_qos = connect_flags >> 3 & 0x03
        will_retain = bool(connect_flags & 0x20)
        if not has_will and (will_qos or will_retain):
            raise RemoteProtocolError("CONNECT has will QoS or will retain set without a will.")
        if will_qos == 3:
            raise RemoteProtocolError("CONNECT asks for will QoS 3.")
        if connect_flags & 0x40 and not connect_flags & 0x80:
            raise RemoteProtocolError("CONNECT has a password without a user name.")
        body, keep_alive = decode_uint16(body)
        body, client_id = decode_string(body)
        will = None
        if has_will:
            body, will_topic = decode_string(body)
            body, will_message = decode_binary(body)
            will = Will(topic=will_topic, message=will_message, qos=QoS(will_qos), retain=will_retain)
        username = password = None
        if connect_flags & 0x80:
            body, username = decode_string(body)
        if connect_flags & 0x40:
            body, password = decode_binary(body)
        _check_consumed(body, cls)
        return cls(
            client_id=client_id,
            username=username,
            password=password,
            clean_session=bool(connect_flags & 0x02),
            keep_alive=keep_alive,
            will=will,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Connack(Packet):
    """CONNACK (§3.2)."""

    packet_type = PacketType.CONNACK
    return_code: ConnectReturnCode = ConnectReturnCode.ACCEPTED
    session_present: bool = False

    def __post_init__(self) -> None:
        if self.session_present and self.return_code is not ConnectReturnCode.ACCEPTED:
            raise LocalProtocolError("A refusing CONNACK cannot have session present (MQTT-3.2.2-4).")

    def _encode_body(self, buffer: bytearray) -> None:
        buffer.append(1 if self.session_present else 0)
        buffer.append(self.return_code)

    @classmethod
    def decode_body(cls, flags: int, body: memoryview) -> Connack:
        body, ack_flags = decode_uint8(body)
        body, code = decode_uint8(body)
        _check_consumed(body, cls)
        if ack_flags & 0xFE:
            raise RemoteProtocolError("Reserved CONNACK flags are set.")
        return cls(
            return_code=_enum(ConnectReturnCode, code, "CONNACK return code"), session_present=bool(ack_flags)
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Publish(Packet):
    """PUBLISH (§3.3). ``packet_id`` is set exactly when ``qos`` is above 0."""

    packet_type = PacketType.PUBLISH
    topic: str
    payload: bytes = b""
    qos: QoS = QoS.AT_MOST_ONCE
    packet_id: int | None = None
    retain: bool = False
    dup: bool = False

    def __post_init__(self) -> None:
        _check_topic_name(self.topic)
        if self.qos is QoS.AT_MOST_ONCE:
            if self.packet_id is not None or self.dup:
                raise LocalProtocolError("A QoS 0 PUBLISH has no packet identifier and no DUP flag.")
        elif self.packet_id is None:
            raise LocalProtocolError(f"A QoS {int(self.qos)} PUBLISH needs a packet identifier.")
        else:
            _check_packet_id(self.packet_id, "PUBLISH")

    def _flags(self) -> int:
        return (0x08 if self.dup else 0) | self.qos << 1 | (0x01 if self.retain else 0)

    def _encode_body(self, buffer: bytearray) -> None:
        encode_string(self.topic, buffer)
        if self.packet_id is not None:
            encode_uint16(self.packet_id, buffer)
        buffer += self.payload

    @classmethod
    def decode_body(cls, flags: int, body: memoryview) -> Publish:
        qos = flags >> 1 & 0x03
        if qos == 3:
            raise RemoteProtocolError("A PUBLISH has QoS 3.")
        body, topic = decode_string(body)
        packet_id = None
        if qos:
            body, packet_id = decode_uint16(body)
        return cls(
            topic=topic,
            payload=bytes(body),
            qos=QoS(qos),
            packet_id=packet_id,
            retain=bool(flags & 0x01),
            dup=bool(flags & 0x08),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class _PacketIdOnly(Packet):
    packet_id: int

    def __post_init__(self) -> None:
        _check_packet_id(self.packet_id, self.packet_type.name)

    def _encode_body(self, buffer: bytearray) -> None:
        encode_uint16(self.packet_id, buffer)

    @classmethod
    def decode_body(cls, flags: int, body: memoryview) -> Packet:
        body, packet_id = decode_uint16(body)
        _check_consumed(body, cls)
        return cls(packet_id=packet_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class Puback(_PacketIdOnly):
    """PUBACK (§3.4)."""

    packet_type = PacketType.PUBACK


@dataclass(frozen=True, slots=True, kw_only=True)
class Unsuback(_PacketIdOnly):
    """UNSUBACK (§3.11)."""

    packet_type = PacketType.UNSUBACK


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscription:
    """One topic filter of a SUBSCRIBE with its requested QoS."""

    topic_filter: str
    qos: QoS = QoS.AT_LEAST_ONCE

    def __post_init__(self) -> None:
        _check_topic_filter(self.topic_filter)


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscribe(Packet):
    """SUBSCRIBE (§3.8)."""

    packet_type = PacketType.SUBSCRIBE
    packet_id: int
    subscriptions: tuple[Subscription, ...]

    def __post_init__(self) -> None:
        _check_packet_id(self.packet_id, "SUBSCRIBE")
        if not self.subscriptions:
            raise LocalProtocolError("A SUBSCRIBE needs at least one topic filter (MQTT-3.8.3-3).")

    def _encode_body(self, buffer: bytearray) -> None:
        encode_uint16(self.packet_id, buffer)
        for subscription in self.subscriptions:
            encode_string(subscription.topic_filter, buffer)
            buffer.append(subscription.qos)

    @classmethod
    def decode_body(cls, flags: int, body: memoryview) -> Subscribe:
        body, packet_id = decode_uint16(body)
        subscriptions = []
        while body:
            body, topic_filter = decode_string(body)
            body, requested = decode_uint8(body)
            if requested > 2:
                raise RemoteProtocolError(f"A SUBSCRIBE asks for QoS byte {requested:#04x} (MQTT-3-8.3-4).")
            subscriptions.append(Subscription(topic_filter=topic_filter, qos=QoS(requested)))
        return cls(packet_id=packet_id, subscriptions=tuple(subscriptions))


@dataclass(frozen=True, slots=True, kw_only=True)
class Suback(Packet):
    """SUBACK (§3.9): one return code per topic filter of the SUBSCRIBE, in order."""

    packet_type = PacketType.SUBACK
    packet_id: int
    return_codes: tuple[SubackReturnCode, ...]

    def __post_init__(self) -> None:
        _check_packet_id(self.packet_id, "SUBACK")
        if not self.return_codes:
            raise LocalProtocolError("A SUBACK needs at least one return code.")

    def _encode_body(self, buffer: bytearray) -> None:
        encode_uint16(self.packet_id, buffer)
        buffer += bytes(self.return_codes)

    @classmethod
    def decode_body(cls, flags: int, body: memoryview) -> Suback:
        body, packet_id = decode_uint16(body)
        codes = tuple(_enum(SubackReturnCode, code, "SUBACK return code") for code in body)
        return cls(packet_id=packet_id, return_codes=codes)


@dataclass(frozen=True, slots=True, kw_only=True)
class Unsubscribe(Packet):
    """UNSUBSCRIBE (§3.10)."""

    packet_type = PacketType.UNSUBSCRIBE
    packet_id: int
    topic_filters: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_packet_id(self.packet_id, "UNSUBSCRIBE")
        if not self.topic_filters:
            raise LocalProtocolError("An UNSUBSCRIBE needs at least one topic filter (MQTT-3.10.3-2).")
        for topic_filter in self.topic_filters:
            _check_topic_filter(topic_filter)

    def _encode_body(self, buffer: bytearray) -> None:
        encode_uint16(self.packet_id, buffer)
        for topic_filter in self.topic_filters:
            encode_string(topic_filter, buffer)

    @classmethod
    def decode_body(cls, flags: int, body: memoryview) -> Unsubscribe:
        body, packet_id = decode_uint16(body)
        filters = []
        while body:
            body, topic_filter = decode_string(body)
            filters.append(topic_filter)
        return cls(packet_id=packet_id, topic_filters=tuple(filters))


@dataclass(frozen=True, slots=True, kw_only=True)
class Pingreq(Packet):
    """PINGREQ (§3.12)."""

    packet_type = PacketType.PINGREQ


@dataclass(frozen=True, slots=True, kw_only=True)
class Pingresp(Packet):
    """PINGRESP (§3.13)."""

    packet_type = PacketType.PINGRESP


@dataclass(frozen=True, slots=True, kw_only=True)
class Disconnect(Packet):
    """DISCONNECT (§3.14)."""

    packet_type = PacketType.DISCONNECT


# --- whole packets ---------------------------------------------------------------------------------


def _check_consumed(body: memoryview, cls: type[Packet]) -> None:
    if body:
        raise RemoteProtocolError(
            f"A {cls.packet_type.name} packet has {len(body)} bytes after its last field."
        )


def _enum(enum_type: type[_E], value: int, what: str) -> _E:
    try:
        return enum_type(value)
    except ValueError:
        raise RemoteProtocolError(f"{value:#04x} is not a {what}.") from None


def encode_packet(packet: Packet) -> bytes:
    buffer = bytearray()
    packet.encode(buffer)
    return bytes(buffer)


def decode_packet(
    data: memoryview, *, max_packet_size: int = DEFAULT_MAX_PACKET_SIZE
) -> tuple[memoryview, Packet]:
    """Decode the first packet of ``data``; return the bytes after it and the packet.

    :raises InsufficientData: ``data`` ends inside the packet (feed more).
    :raises RemoteProtocolError: the bytes break the MQTT 3.1.1 grammar, name an unsupported
        packet type, or announce a packet larger than ``max_packet_size`` (raised as soon as
        the remaining length is read, before the body arrives).
    """
    if not data:
        raise InsufficientData
    first = data[0]
    try:
        packet_type = PacketType(first >> 4)
    except ValueError:
        raise RemoteProtocolError(f"Packet type {first >> 4} is reserved.") from None
    cls = PACKET_CLASSES.get(packet_type)
    if cls is None:
        raise RemoteProtocolError(f"{packet_type.name} packets (QoS 2 flows) are not supported.")
    flags = first & 0x0F
    if packet_type is not PacketType.PUBLISH and flags != _FIXED_FLAGS.get(packet_type, 0):
        raise RemoteProtocolError(f"A {packet_type.name} packet has the reserved flags {flags:#06b}.")
    rest, length = decode_varint(data[1:])
    size = len(data) - len(rest) + length
    if size > max_packet_size:
        raise RemoteProtocolError(
            f"A {packet_type.name} packet of {size} bytes exceeds the maximum packet size of {max_packet_size} bytes."
        )
    if len(rest) < length:
        raise InsufficientData
    body = rest[:length]
    try:
        packet = cls.decode_body(flags, body)
    except InsufficientData:
        raise RemoteProtocolError(f"A {packet_type.name} packet ends inside a field.") from None
    except LocalProtocolError as exc:  # the decoded fields break a rule the constructor checks
        raise RemoteProtocolError(exc.message) from None
    return rest[length:], packet
