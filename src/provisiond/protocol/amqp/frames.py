"""AMQP 1.0 framing (Part 2 §2.2-§2.3, Part 5 §5.3.1): protocol headers and frames, sans-io.

A connection starts with an 8-byte protocol header, ``AMQP`` then protocol id, major, minor,
revision: ``AMQP\\x03\\x01\\x00\\x00`` opens the SASL layer, ``AMQP\\x00\\x01\\x00\\x00`` the AMQP
layer (``AMQP\\x02...`` would be TLS, which provisiond does below AMQP instead).

A frame is::

    SIZE (4, the whole frame) | DOFF (1, header length in 4-byte words, >= 2) | TYPE (1) |
    CHANNEL (2; ignored for SASL) | extended header (DOFF*4 - 8 bytes, ignored) | body

Type 0x00 is an AMQP frame, 0x01 a SASL frame. The body is one performative (a described
list), followed by the message payload for a transfer. An AMQP frame with no body is an empty
frame: a heartbeat.

``decode_frame`` raises :class:`~provisiond.errors.InsufficientData` until the whole frame is
there, refuses a frame larger than ``max_frame_size`` as soon as its size field is readable
(``amqp:connection:framing-error``), so that a peer cannot make the decoder buffer more than
that, and treats anything wrong inside a complete frame as malformed
(``amqp:decode-error``), never as "need more".

Frames that every connection of a peer's kind sends alike (an SDK's begin, flow, disposition
and close are the same bytes on every connection) are decoded once: a small bounded table
maps the bytes of a short frame to the frame they decode to, when that frame holds only
immutable values (:func:`decode_frame`); likewise the bytes of the short frames we send
alike (:func:`encode_frame`). Frames and performatives are immutable, so sharing them
between connections is safe; a peer sending ever different frames only churns the table.
The machines make the performatives they send alike through :class:`Templates`: one per
distinct tuple of the values a call site makes it from, so that such a frame costs a tuple
and two lookups rather than a performative (a frozen dataclass's ``__init__``) each time.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ...errors import AmqpProtocolError, InsufficientData, LocalProtocolError
from .performatives import (
    Begin,
    Close,
    Composite,
    Detach,
    Disposition,
    End,
    Flow,
    Performative,
    SaslOutcome,
    Transfer,
    decode_composite_at,
    write_composite,
)

__all__ = [
    "HEADER_SIZE",
    "MIN_MAX_FRAME_SIZE",
    "Frame",
    "FrameType",
    "ProtocolHeader",
    "ProtocolId",
    "Templates",
    "decode_frame",
    "frame_at",
    "write_frame",
    "decode_protocol_header",
    "encode_frame",
    "frame_size",
]

#: The frame header's size; also the smallest legal frame (an empty frame).
HEADER_SIZE = 8
#: The largest frame every peer must accept before open negotiates (Part 2 §2.7.1), and the
#: limit of SASL frames.
MIN_MAX_FRAME_SIZE = 512

_FRAME_HEADER = struct.Struct(">IBBH")


class ProtocolId(enum.IntEnum):
    AMQP = 0
    TLS = 2
    SASL = 3


class FrameType(enum.IntEnum):
    AMQP = 0x00
    SASL = 0x01


@dataclass(frozen=True, slots=True)
class ProtocolHeader:
    """``AMQP`` + protocol id + version (1.0.0 is the only one)."""

    protocol: ProtocolId
    version: tuple[int, int, int] = (1, 0, 0)

    def encode(self) -> bytes:
        return b"AMQP" + bytes((self.protocol, *self.version))


def decode_protocol_header(data: memoryview | bytes) -> tuple[memoryview, ProtocolHeader]:
    """The protocol header at the start of ``data``.

    :raises InsufficientData: fewer than 8 bytes.
    :raises AmqpProtocolError: not an AMQP protocol header, or an unknown protocol id
        (``amqp:connection:framing-error``). The caller answers with the header it supports.
    """
    view = memoryview(data)
    # A prefix that can no longer become "AMQP" is refused at once, not after 8 bytes.
    head = bytes(view[:4])
    if not b"AMQP".startswith(head):
        raise AmqpProtocolError(
            f"{bytes(view[:32])!r} is not an AMQP protocol header.", condition="amqp:connection:framing-error"
        )
    if len(view) < 8:
        raise InsufficientData
    try:
        protocol = ProtocolId(view[4])
    except ValueError:
        raise AmqpProtocolError(
            f"Unknown AMQP protocol id {view[4]}", condition="amqp:connection:framing-error"
        ) from None
    return view[8:], ProtocolHeader(protocol, (view[5], view[6], view[7]))


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame. ``performative`` is None for an empty (heartbeat) frame; ``payload`` is a
    transfer's message bytes (a part of them when ``more`` is set)."""

    type: FrameType
    channel: int
    performative: Performative | None
    payload: bytes = b""

    def __post_init__(self) -> None:
        if not 0 <= self.channel <= 0xFFFF:
            raise LocalProtocolError(f"{self.channel} is not a channel number")
        if self.payload and not isinstance(self.performative, Transfer):
            raise LocalProtocolError("Only a transfer frame carries a payload")
        if self.performative is not None and self.performative.sasl != (self.type is FrameType.SASL):
            raise LocalProtocolError(
                f"A {type(self.performative).__name__} does not go in a {self.type.name} frame"
            )


#: Frames of at most this many bytes are looked up in the tables of frames met before.
SHARED_FRAME_SIZE = 64
#: Entries in each table (it is emptied when full).
_SHARED_ENTRIES = 512
_DECODED: dict[bytes, Frame] = {}
_ENCODED: dict[tuple[FrameType, int, Performative | None], bytes] = {}
#: The performatives shared that way (the others are mostly unique to a link or delivery).
_SHARED = frozenset({Begin, Close, Detach, Disposition, End, Flow, SaslOutcome})


P = TypeVar("P")


class Templates(Generic[P]):
    """The performatives (or their frames' bytes) one call site makes, one per distinct tuple of
    the values it makes them from: ``templates(*values)`` is ``make(*values)``, made once while
    the table holds it (at most :data:`_SHARED_ENTRIES`, emptied when full). Only for what is
    immutable; values that cannot be hashed (a map) make a new one each time."""

    __slots__ = ("_made", "_make")

    def __init__(self, make: Callable[..., P]) -> None:
        self._make = make
        self._made: dict[tuple[Any, ...], P] = {}

    def __call__(self, *values: Any) -> P:
        try:
            found = self._made.get(values)
        except TypeError:  # a map among the values
            return self._make(*values)
        if found is None:
            found = self._make(*values)
            if len(self._made) >= _SHARED_ENTRIES:
                self._made.clear()
            self._made[values] = found
        return found

    def __len__(self) -> int:
        return len(self._made)


def _immutable(value: Any) -> bool:
    """Whether ``value`` holds nothing mutable (so that one decoded frame may be shared)."""
    if value is None or isinstance(value, int | str | bytes | float | enum.Enum):
        return True
    if isinstance(value, Composite):
        return all(_immutable(field) for field in vars(value).values())
    return False


def encode_frame(frame: Frame, buffer: bytearray) -> None:
    """Append ``frame`` (DOFF 2: no extended header)."""
    write_frame(buffer, frame.type, frame.channel, frame.performative, frame.payload)


def write_frame(
    buffer: bytearray,
    frame_type: FrameType,
    channel: int,
    performative: Performative | None,
    payload: bytes = b"",
) -> None:
    """Append the frame of these parts, as :func:`encode_frame` would once they are checked as
    a :class:`Frame` (the connection's path: what it sends is well formed by construction)."""
    if type(performative) in _SHARED and not payload:
        key = (frame_type, channel, performative)
        try:
            encoded = _ENCODED.get(key)
        except TypeError:  # a field holds a map: not hashable, not shared
            pass
        else:
            if encoded is None:
                encoded = _encode(frame_type, channel, performative, payload)
                if len(encoded) <= SHARED_FRAME_SIZE:
                    if len(_ENCODED) >= _SHARED_ENTRIES:
                        _ENCODED.clear()
                    _ENCODED[key] = encoded
            buffer += encoded
            return
    buffer += _encode(frame_type, channel, performative, payload)


def _encode(frame_type: FrameType, channel: int, performative: Performative | None, payload: bytes) -> bytes:
    body = bytearray()
    if performative is not None:
        write_composite(performative, body)
        body += payload
    return _FRAME_HEADER.pack(HEADER_SIZE + len(body), 2, frame_type, channel) + body


def frame_size(performative: Performative, payload_size: int = 0) -> int:
    """The size of the frame that would carry ``performative`` and that much payload."""
    body = bytearray()
    write_composite(performative, body)
    return HEADER_SIZE + len(body) + payload_size


def _framing(message: str) -> AmqpProtocolError:
    return AmqpProtocolError(message, condition="amqp:connection:framing-error")


_FRAME_TYPE_OF = {int(t): t for t in FrameType}


def decode_frame(data: memoryview | bytes, max_frame_size: int) -> tuple[memoryview, Frame]:
    """The frame at the start of ``data``.

    :raises InsufficientData: the frame is not complete yet.
    :raises AmqpProtocolError: a bad size or data offset, an unknown frame type, a frame over
        ``max_frame_size`` (``amqp:connection:framing-error``); a body that is not one known
        performative of the frame's type, or a payload after anything but a transfer
        (``amqp:decode-error``).
    """
    buf = data if isinstance(data, bytes | bytearray) else bytes(data)
    found = frame_at(buf, max_frame_size)
    if found is None:
        raise InsufficientData
    frame, size = found
    return memoryview(data)[size:], frame


def frame_at(buf: bytes | bytearray, max_frame_size: int) -> tuple[Frame, int] | None:
    """The frame at the start of ``buf`` and its size; None when it is not complete yet (no
    exception: the common case of a connection waiting for bytes). Refusals as
    :func:`decode_frame`'s."""
    if len(buf) < HEADER_SIZE:
        return None
    size, doff, type_code, channel = _FRAME_HEADER.unpack_from(buf)
    if size < HEADER_SIZE:
        raise _framing(f"A frame of size {size} is smaller than its header.")
    if size > max_frame_size:
        raise _framing(f"A frame of {size} bytes exceeds the maximum frame size of {max_frame_size}.")
    if doff < 2 or doff * 4 > size:
        raise _framing(f"A frame's data offset {doff} is outside its size {size}.")
    frame_type = _FRAME_TYPE_OF.get(type_code)
    if frame_type is None:
        raise _framing(f"Unknown frame type {type_code:#04x}.")
    if len(buf) < size:
        return None
    if size <= SHARED_FRAME_SIZE:
        key = bytes(buf[:size])
        frame = _DECODED.get(key)
        if frame is None:
            frame = _decode_body(key, doff, frame_type, channel)
            if type(frame.performative) in _SHARED and _immutable(frame.performative):
                if len(_DECODED) >= _SHARED_ENTRIES:
                    _DECODED.clear()
                _DECODED[key] = frame
        return frame, size
    return _decode_body(bytes(buf[:size]), doff, frame_type, channel), size


def _decode_body(data: bytes, doff: int, frame_type: FrameType, channel: int) -> Frame:
    """The frame whose whole bytes are ``data``."""
    raw = data[doff * 4 :]
    if frame_type is FrameType.SASL:
        channel = 0  # ignored for SASL frames (Part 5 §5.3.1)
    if not raw:
        if frame_type is FrameType.SASL:
            raise AmqpProtocolError("An empty SASL frame.", condition="amqp:decode-error")
        return Frame(frame_type, channel, None)
    try:
        performative, after = decode_composite_at(raw, 0, len(raw))
    except InsufficientData:
        raise AmqpProtocolError(
            "A frame's performative is truncated.", condition="amqp:decode-error"
        ) from None
    if not isinstance(performative, Performative) or performative.sasl != (frame_type is FrameType.SASL):
        raise AmqpProtocolError(
            f"A {type(performative).__name__} is not a performative of a {frame_type.name} frame.",
            condition="amqp:decode-error",
        )
    if after < len(raw) and not isinstance(performative, Transfer):
        raise AmqpProtocolError(
            f"{len(raw) - after} bytes follow a {type(performative).__name__}.", condition="amqp:decode-error"
        )
    return Frame(frame_type, channel, performative, raw[after:])
