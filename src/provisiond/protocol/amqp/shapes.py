"""The bytes of the fast path (:mod:`.fastpath`): the SDKs' attaches read from the shape of
one read before, and the answers the machines write through the composites' writers, written
from parts made once with those same writers.

The SDKs' attaches differ from one device to the next only in the link's name and the device's
address (its terminus's). An attach whose bytes are those of one read before, but for the name
and the one place the address is, is that attach with the two strings put back: its bytes are
read once per shape by the general decoder (the placeholders keep every length, so every size
and offset is the same), checked to hold the placeholders exactly in the name and one terminus's
address and only immutable values in its maps, and kept; the strings are decoded as the reader
decodes them (UTF-8), and each attach gets its own copies of the maps.

The machine writes an attach, a transfer and a message through their composites' writers
(:func:`~.performatives.write_composite`): a described list of the fields, each null when it is
None or its default, trailing nulls cut. The answering attach's fields but its name and termini,
a transfer's performative, and the answer's properties are written from parts made once.
``tests/service/test_amqp_fastpath.py`` compares both ways byte for byte.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ...errors import AmqpProtocolError
from .frames import _FRAME_HEADER, HEADER_SIZE, _immutable, frame_at
from .performatives import (
    Attach,
    Data,
    Message,
    Open,
    Properties,
    Role,
    SaslInit,
    SndSettleMode,
    Source,
    Target,
    Transfer,
    _layout,
    write_composite,
)
from .session import _TRANSFERS
from .types import encode_value

__all__ = [
    "Reply",
    "attach_and_termini",
    "attach_like",
    "open_like",
    "sasl_init_like",
    "transfer_like",
    "write_attach",
    "write_transfer",
]

_LIST32 = struct.Struct(">II")


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer's message as the endpoint sends it: properties with a message-id and the
    request's correlation-id, application properties (or None), one data section."""

    message_id: str
    correlation_id: Any
    application_properties: dict[str, Any] | None
    body: bytes

    def message(self) -> Message:
        return Message(
            properties=Properties(message_id=self.message_id, correlation_id=self.correlation_id),
            application_properties=self.application_properties,
            body=(Data(self.body),),
        )

    def payload(self) -> bytes:
        """``encode_message(self.message())``, written from its parts."""
        props = bytearray()
        _MESSAGE_ID.write(self.message_id, props)
        count = 1
        if self.correlation_id is not None:
            props += b"\x40\x40\x40\x40"  # user-id, to, subject, reply-to
            _CORRELATION_ID.write(self.correlation_id, props)
            count = 6
        size = len(props)
        buffer = bytearray(_PROPERTIES.prefix)
        buffer += bytes((0xC0, size + 1, count)) if size < 255 else b"\xd0" + _LIST32.pack(size + 4, count)
        buffer += props
        if self.application_properties is not None:
            buffer += _APPLICATION_PROPERTIES
            encode_value(self.application_properties, buffer)
        body = self.body
        buffer += _DATA
        buffer += bytes((0xA0, len(body))) if len(body) < 256 else b"\xb0" + len(body).to_bytes(4, "big")
        buffer += body
        return bytes(buffer)


# --- attaches read from one made before ------------------------------------------------------------
#
# The SDKs' attaches differ from one device to the next only in the link's name and the
# device's address (its terminus's). An attach whose bytes are those of one read before, but
# for the name and the one place the address is, is that attach with the two strings put back:
# its bytes are read once per shape (the placeholders keep every length, so every size and
# offset is the same), checked to hold the placeholders exactly in the name and one terminus's
# address, and kept; the strings are decoded as the reader decodes them (UTF-8).

_SHAPES: dict[tuple[bytes, int, bytes, int, bytes], _Shape | None] = {}


def attach_like(frame: bytes, address: bytes) -> Attach | None:
    """The attach ``frame`` (a whole frame, DOFF 2) decodes to, from the one of its shape read
    before; None when it has no known shape (read it the general way)."""
    found = attach_and_termini(frame, address)
    return None if found is None else found[0]


def attach_and_termini(frame: bytes, address: bytes) -> tuple[Attach, bytes | None] | None:
    """:func:`attach_like`, and the encoding of its source and target as
    :func:`write_attach` echoes them (None: encode them), from the shape's with the address
    put back."""
    at = _first_field(frame)
    if not at or len(frame) < at + 2 or frame[at] != 0xA1:  # a str8 name
        return None
    name_end = at + 2 + frame[at + 1]
    where = frame.find(address, name_end)
    if where < 0 or frame.find(address, where + 1) >= 0:
        return None
    after = where + len(address)
    key = (frame[: at + 2], name_end - at - 2, frame[name_end:where], len(address), frame[after:])
    shape = _known(_SHAPES, key, _read_shape)
    if shape is None:
        return None
    template, in_source, termini, other_maps = shape
    try:
        name = frame[at + 2 : name_end].decode("utf-8")
        text = address.decode("utf-8")
    except UnicodeDecodeError:
        return None
    attach: Attach = _copy(template)
    attach.__dict__["name"] = name
    put = _copy(template.source if in_source else template.target)
    put.__dict__["address"] = text
    attach.__dict__["source" if in_source else "target"] = put
    other = "target" if in_source else "source"
    if other_maps:  # the other terminus holds maps: each connection its own (else shared)
        attach.__dict__[other] = _copy(attach.__dict__[other])
    return attach, None if termini is None else termini[0] + address + termini[1]


def open_like(frame: bytes) -> Open | None:
    """The open ``frame`` (a whole frame, DOFF 2) decodes to, from the one of its shape read
    before (an SDK's opens differ in their container-id, the first field); None when it has no
    known shape."""
    at = _first_field(frame)
    if not at or len(frame) < at + 2 or frame[at] != 0xA1:  # a str8 container-id
        return None
    end = at + 2 + frame[at + 1]
    key = (frame[: at + 2], end - at - 2, frame[end:])
    template = _known(_OPENS, key, _read_open)
    if template is None:
        return None
    try:
        container_id = frame[at + 2 : end].decode("utf-8")
    except UnicodeDecodeError:
        return None
    made: Open = _copy(template)
    made.__dict__["container_id"] = container_id
    return made


_OPENS: dict[tuple[bytes, int, bytes], Open | None] = {}


def sasl_init_like(frame: bytes) -> SaslInit | None:
    """The sasl-init ``frame`` (a whole SASL frame, DOFF 2) decodes to, from the one of its
    shape read before (the SDKs' differ in their initial response: PLAIN's user and token);
    None when it has no known shape."""
    at = _first_field(frame)
    if not at or len(frame) < at + 2 or frame[at] != 0xA3:  # a sym8 mechanism
        return None
    start = at + 2 + frame[at + 1]
    if len(frame) < start + 5:
        return None
    code = frame[start]
    if code == 0xA0:  # vbin8
        size, begin = frame[start + 1], start + 2
    elif code == 0xB0:  # vbin32
        size, begin = int.from_bytes(frame[start + 1 : start + 5], "big"), start + 5
    else:
        return None
    end = begin + size
    if end > len(frame):
        return None
    template = _known(_SASL_INITS, (frame[:begin], size, frame[end:]), _read_sasl_init)
    if template is None:
        return None
    made: SaslInit = _copy(template)
    made.__dict__["initial_response"] = frame[begin:end]
    return made


_SASL_INITS: dict[tuple[bytes, int, bytes], SaslInit | None] = {}


def _read_sasl_init(key: tuple[bytes, int, bytes]) -> SaslInit | None:
    head, size, tail = key
    placeholder = bytes((_NAME_MARK,)) * size
    init = _alone(head + placeholder + tail, SaslInit)
    return init if init is not None and init.initial_response == placeholder else None


def transfer_like(frame: bytes) -> tuple[Transfer, bytes] | None:
    """The transfer ``frame`` (a whole frame, DOFF 2) decodes to and its payload, the transfer
    from the one of the same performative bytes read before (an SDK's first request's is the
    same on every connection); None when it has none, or holds a mutable value."""
    code = frame[11]
    end = 13 + frame[12] if code == 0xC0 else 16 + int.from_bytes(frame[12:16], "big") if code == 0xD0 else 0
    if not end or end > len(frame):
        return None
    transfer = _known(_TRANSFERS_READ, frame[4:end], _read_transfer)
    return None if transfer is None else (transfer, frame[end:])


_TRANSFERS_READ: dict[bytes, Transfer | None] = {}


def _read_transfer(performative: bytes) -> Transfer | None:
    """The transfer of a frame of these performative bytes and no payload; None when it does
    not decode to one that ends exactly there, or holds a mutable value (a delivery state's map)."""
    transfer = _alone((len(performative) + 4).to_bytes(4, "big") + performative, Transfer)
    return transfer if transfer is not None and _immutable(transfer) else None


_K = TypeVar("_K")
_V = TypeVar("_V")

_P = TypeVar("_P")


def _alone(frame: bytes, kind: type[_P]) -> _P | None:
    """The performative ``frame`` decodes to, whole, when it is a ``kind`` with no payload;
    else None (the frame is then read the general way)."""
    try:
        found = frame_at(frame, MAX_SHAPE)
    except AmqpProtocolError:
        return None
    if found is None or type(found[0].performative) is not kind or found[0].payload:
        return None
    performative: _P = found[0].performative
    return performative


def _first_field(frame: bytes) -> int:
    """Where the first field of a whole frame's performative (DOFF 2) starts: after its
    descriptor and list8 or list32 header; 0 when it is not such a list."""
    code = frame[11]
    return 14 if code == 0xC0 else 20 if code == 0xD0 else 0


def _known(table: dict[_K, _V | None], key: _K, read: Callable[[_K], _V | None]) -> _V | None:
    """The shape of ``key``: read on first sight and kept in ``table`` (emptied when it holds
    more than :data:`_TABLE_ENTRIES`), None when frames of that shape are read the general way."""
    found = table.get(key, _UNKNOWN)
    if found is _UNKNOWN:
        found = table[key] = read(key)
        if len(table) > _TABLE_ENTRIES:
            table.clear()
    return found


def _read_open(key: tuple[bytes, int, bytes]) -> Open | None:
    head, size, tail = key
    placeholder = bytes((_NAME_MARK,)) * size
    opened = _alone(head + placeholder + tail, Open)
    if opened is None or opened.container_id != placeholder.decode():
        return None
    properties = opened.properties or {}
    if not all(_immutable(value) for item in properties.items() for value in item):
        return None
    return opened


def _copy(value: Any) -> Any:
    """A composite with its fields, and a copy of each map among them (each connection gets
    its own maps, as from the decoder; their values are immutable, :func:`_read_shape`)."""
    made = object.__new__(type(value))
    fields = made.__dict__
    fields.update(value.__dict__)
    for name, field in fields.items():
        if type(field) is dict:
            fields[name] = dict(field)
    return made


_UNKNOWN: Any = object()
_NAME_MARK = 0x6E  # "n"
_ADDRESS_MARK = 0x61  # "a"


#: An attach's shape: the attach with placeholders, whether the address is its source's, the
#: encoding of its termini as echoed around the address (None: not known), and whether the
#: other terminus holds a map.
_Shape = tuple[Attach, bool, tuple[bytes, bytes] | None, bool]


def _read_shape(key: tuple[bytes, int, bytes, int, bytes]) -> _Shape | None:
    """The attach of one shape, with placeholders for the name and the address, whether the
    address is its source's, and its termini's echo around the address; None when the frame
    does not decode to an attach holding the placeholders exactly there."""
    head, name_size, middle, address_size, tail = key
    name, address = bytes((_NAME_MARK,)) * name_size, bytes((_ADDRESS_MARK,)) * address_size
    attach = _alone(head + name + middle + address + tail, Attach)
    if attach is None:
        return None
    text = address.decode()
    # The address must be a string (str8 or str32), as the one put back: a symbol compares
    # equal to its text but is echoed as a symbol (a mutated session's attach found it).
    in_source = isinstance(attach.source, Source) and _is_text(attach.source.address, text)
    in_target = isinstance(attach.target, Target) and _is_text(attach.target.address, text)
    if attach.name != name.decode() or in_source == in_target:
        return None
    if not isinstance(attach.source, Source | None) or not isinstance(attach.target, Target | None):
        return None  # a terminus of another kind (kept as read): the general way
    maps = [
        field
        for composite in (attach, attach.source, attach.target)
        if composite is not None
        for field in vars(composite).values()
        if isinstance(field, dict)
    ]
    if not all(_immutable(value) for map_ in maps for item in map_.items() for value in item):
        return None  # a map holding a map or a list: read each such attach the general way
    echo = bytearray()
    _write_termini(attach.source, attach.target, echo)
    # The termini with another address of the same length differ only there: one string of
    # the same encoded length. Split around it, when the placeholder is there once.
    at = echo.find(address)
    termini = (bytes(echo[:at]), bytes(echo[at + len(address) :])) if at >= 0 else None
    if at >= 0 and echo.find(address, at + 1) >= 0:
        termini = None
    other = attach.target if in_source else attach.source
    other_maps = other is not None and any(type(field) is dict for field in vars(other).values())
    return attach, in_source, termini, other_maps


def _write_termini(source: Any, target: Any, body: bytearray) -> None:
    """An answering attach's source and target: the peer's, each null unless a Source, a Target."""
    if isinstance(source, Source):
        write_composite(source, body)
    else:
        body.append(0x40)
    if isinstance(target, Target):
        write_composite(target, body)
    else:
        body.append(0x40)


def _is_text(value: Any, text: str) -> bool:
    return type(value) is str and value == text


#: The largest attach read by its shape (the frame's own size was checked against the limit).
MAX_SHAPE = 0xFFFF_FFFF

# --- answers from precomputed bytes ----------------------------------------------------------------
#
# The machine writes an attach and a transfer through their composites' writers
# (:func:`~.performatives.write_composite`): a described list of the fields, each null when it
# is None or its default, trailing nulls cut. The fast path writes the same bytes from parts
# made once: every field of the answering attach but its name and termini, and a transfer's
# performative; only the name and the termini are encoded per link.

_ATTACH = _layout(Attach)
_PROPERTIES = _layout(Properties)
_MESSAGE_ID = next(f for f in _PROPERTIES.fields if f.name == "message_id")
_CORRELATION_ID = next(f for f in _PROPERTIES.fields if f.name == "correlation_id")
_APPLICATION_PROPERTIES = bytes((0x00, 0x53, 0x74))
_DATA = bytes((0x00, 0x53, 0x75))
_ATTACH_FIELDS = {f.name: f for f in _ATTACH.fields}
_HEAD: dict[tuple[int, Role, SndSettleMode], bytes] = {}
_TAIL: dict[tuple[int | None, int], bytes] = {}
_TRANSFER_BODIES: dict[tuple[int, int], bytes] = {}
_TABLE_ENTRIES = 256


def _fields(values: dict[str, Any]) -> bytes:
    """The encoding of consecutive attach fields (none of them the last written)."""
    body = bytearray()
    for name, value in values.items():
        field = _ATTACH_FIELDS[name]
        if value is None or (not field.mandatory and value == field.default):
            body.append(0x40)
        else:
            field.write(value, body)
    return bytes(body)


def write_attach(
    out: bytearray,
    link: Any,
    delivery_count: int | None,
    max_size: int,
    termini: bytes | None = None,
) -> None:
    """The machine's ``Attach(name, handle, role, snd_settle_mode, source, target,
    initial_delivery_count, max_message_size)`` frame on channel 0 (max-message-size is set, so
    the list always ends with it: 11 fields), for ``link`` (its name, handle, role, and the
    peer's attach as ``remote``, whose source and target it echoes: ``termini`` is their
    encoding when known, :func:`attach_and_termini`)."""
    mode = link.remote.snd_settle_mode
    head = _HEAD.get((link.handle, link.role, mode))
    if head is None:
        head = _fields(
            {"handle": link.handle, "role": link.role, "snd_settle_mode": mode, "rcv_settle_mode": None}
        )
        if len(_HEAD) >= _TABLE_ENTRIES:
            _HEAD.clear()
        _HEAD[link.handle, link.role, mode] = head
    tail = _TAIL.get((delivery_count, max_size))
    if tail is None:
        last = bytearray()
        _ATTACH_FIELDS["max_message_size"].write(max_size, last)
        fields = {"unsettled": None, "incomplete_unsettled": False, "initial_delivery_count": delivery_count}
        tail = _fields(fields) + last
        if len(_TAIL) >= _TABLE_ENTRIES:
            _TAIL.clear()
        _TAIL[delivery_count, max_size] = tail
    body = bytearray()
    _ATTACH_FIELDS["name"].write(link.name, body)
    body += head
    if termini is None:
        _write_termini(link.remote.source, link.remote.target, body)
    else:
        body += termini
    body += tail
    size = len(body)
    list_head = bytes((0xC0, size + 1, 11)) if size < 255 else b"\xd0" + _LIST32.pack(size + 4, 11)
    out += _FRAME_HEADER.pack(HEADER_SIZE + len(_ATTACH.prefix) + len(list_head) + size, 2, 0, 0)
    out += _ATTACH.prefix
    out += list_head
    out += body


def write_transfer(out: bytearray, handle: int, delivery_id: int, payload: bytes) -> None:
    """The machine's first (and only) transfer of an unsettled delivery on channel 0."""
    key = (handle, delivery_id)
    performative = _TRANSFER_BODIES.get(key)
    if performative is None:
        body = bytearray()
        write_composite(_TRANSFERS(handle, delivery_id, False), body)
        performative = bytes(body)
        if len(_TRANSFER_BODIES) >= _TABLE_ENTRIES:
            _TRANSFER_BODIES.clear()
        _TRANSFER_BODIES[key] = performative
    out += _FRAME_HEADER.pack(HEADER_SIZE + len(performative) + len(payload), 2, 0, 0)
    out += performative
    out += payload
