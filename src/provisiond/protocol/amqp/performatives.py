"""AMQP 1.0 composite types, declared once for both roles: the transport performatives (Part 2
§2.7), the error and delivery states (Part 2 §2.8, Part 3 §3.4), source and target (Part 3
§3.5) and the SASL frames (Part 5 §5.3.3); the message sections (Part 3 §3.2) are in
:mod:`.message` and named here too.

Each composite is a frozen dataclass whose fields carry their AMQP wire type in the field's
metadata (:func:`amqp_field`). One generic pair of functions maps every composite to and from
its described list (:func:`encode_composite`, :func:`decode_composite`): a field equal to its
default is sent as null, trailing nulls are dropped, a null or missing field decodes as its
default, a missing mandatory field or a field of the wrong type is a decode error. Composite
classes register themselves by descriptor code and by descriptor name (``__init_subclass__``),
so that either form of descriptor decodes. Fields a later protocol version adds are ignored.
The frames' path does the same without the described list: each class's writer and reader
are made once from its fields (:mod:`.codegen`), and the generic loop remains the reference
(a test compares them) and the reader of last resort, whose errors name the field.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from ...errors import AmqpProtocolError, InsufficientData
from .codegen import FieldSpec, Unrecognised, make_reader, make_reader_at, make_writer
from .decoding import WIRE, decode_at, list_at
from .types import (
    Array,
    Described,
    Symbol,
    Timestamp,
    TypeCode,
    UByte,
    UInt,
    ULong,
    UShort,
    encode_value,
    int_writer,
    register_encoder,
    symbol_array,
    write_string,
)

__all__ = [
    "COMPOSITES",
    "Accepted",
    "AmqpSequence",
    "AmqpValue",
    "ApplicationProperties",
    "Attach",
    "Begin",
    "Close",
    "Composite",
    "Data",
    "DeliveryAnnotations",
    "DeliveryState",
    "Detach",
    "Disposition",
    "End",
    "Error",
    "ErrorCondition",
    "Flow",
    "Footer",
    "Header",
    "Kind",
    "Message",
    "MessageAnnotations",
    "Modified",
    "Open",
    "Performative",
    "Properties",
    "RcvSettleMode",
    "Received",
    "Rejected",
    "Released",
    "Role",
    "SaslChallenge",
    "SaslCode",
    "SaslInit",
    "SaslMechanisms",
    "SaslOutcome",
    "SaslResponse",
    "SndSettleMode",
    "Source",
    "Target",
    "Transfer",
    "amqp_field",
    "decode_composite",
    "decode_composite_at",
    "decode_message",
    "encode_composite",
    "encode_message",
    "write_composite",
]


def _invalid(message: str) -> AmqpProtocolError:
    return AmqpProtocolError(message, condition="amqp:decode-error")


# --- enums -------------------------------------------------------------------------------------


class Role(enum.Enum):
    """A link end's role (a boolean on the wire)."""

    SENDER = False
    RECEIVER = True


class SndSettleMode(enum.IntEnum):
    UNSETTLED = 0
    SETTLED = 1
    MIXED = 2


class RcvSettleMode(enum.IntEnum):
    FIRST = 0
    SECOND = 1


class SaslCode(enum.IntEnum):
    """sasl-outcome codes (Part 5 §5.3.3.6)."""

    OK = 0
    AUTH = 1
    SYS = 2
    SYS_PERM = 3
    SYS_TEMP = 4


class ErrorCondition(enum.StrEnum):
    """The error conditions provisiond sends (Part 2 §2.8.15-§2.8.18). Peers may send others:
    :attr:`Error.condition` is a plain symbol."""

    INTERNAL_ERROR = "amqp:internal-error"
    NOT_FOUND = "amqp:not-found"
    UNAUTHORIZED_ACCESS = "amqp:unauthorized-access"
    DECODE_ERROR = "amqp:decode-error"
    RESOURCE_LIMIT_EXCEEDED = "amqp:resource-limit-exceeded"
    NOT_ALLOWED = "amqp:not-allowed"
    INVALID_FIELD = "amqp:invalid-field"
    NOT_IMPLEMENTED = "amqp:not-implemented"
    PRECONDITION_FAILED = "amqp:precondition-failed"
    ILLEGAL_STATE = "amqp:illegal-state"
    FRAME_SIZE_TOO_SMALL = "amqp:frame-size-too-small"
    CONNECTION_FORCED = "amqp:connection:forced"
    FRAMING_ERROR = "amqp:connection:framing-error"
    WINDOW_VIOLATION = "amqp:session:window-violation"
    ERRANT_LINK = "amqp:session:errant-link"
    HANDLE_IN_USE = "amqp:session:handle-in-use"
    UNATTACHED_HANDLE = "amqp:session:unattached-handle"
    DETACH_FORCED = "amqp:link:detach-forced"
    TRANSFER_LIMIT_EXCEEDED = "amqp:link:transfer-limit-exceeded"
    MESSAGE_SIZE_EXCEEDED = "amqp:link:message-size-exceeded"


# --- field kinds -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """An AMQP field type: how a decoded value is checked and converted (``decode``) and how a
    Python value is wrapped for the encoder (``encode``)."""

    name: str
    decode: Callable[[Any], Any]
    encode: Callable[[Any], Any]
    #: Appends a Python value's encoding at once (else ``encode_value(encode(value), buffer)``).
    write: Callable[[Any, bytearray], None] | None = None


def _unsigned(wrap: type[int]) -> Kind:
    def decode(value: Any) -> Any:
        if type(value) is wrap:
            return value
        # Any unsigned encoding that fits is accepted (some peers widen small fields).
        if not isinstance(value, UByte | UShort | UInt | ULong):
            raise _invalid(f"expected {wrap.__name__.lower()}, got {type(value).__name__}")
        try:
            return wrap(value)
        except Exception:
            raise _invalid(f"{int(value)} does not fit a {wrap.__name__.lower()}") from None

    def encode(value: Any) -> Any:
        return value if type(value) is wrap else wrap(value)

    return Kind(wrap.__name__.lower(), decode, encode, int_writer(wrap))


def _typed(name: str, types: type | tuple[type, ...], convert: Callable[[Any], Any] | None = None) -> Kind:
    def decode(value: Any) -> Any:
        if not isinstance(value, types):
            raise _invalid(f"expected {name}, got {type(value).__name__}")
        return value if convert is None else convert(value)

    if convert is None:  # the value is encoded as it is
        return Kind(name, decode, lambda v: v, encode_value)
    if convert is str:

        def write(value: Any, buffer: bytearray) -> None:
            write_string(value if type(value) is str else str(value), buffer)

        return Kind(name, decode, convert, write)
    return Kind(name, decode, convert)


def _enum_kind(enum_type: type[enum.Enum], base: Kind) -> Kind:
    # The members by value: a dict lookup, not the enum's call (a Python-level lookup each time).
    members: dict[Any, enum.Enum] = {member.value: member for member in enum_type}

    def decode(value: Any) -> Any:
        raw = base.decode(value)
        member = members.get(raw)
        if member is not None:
            return member
        try:
            return enum_type(raw if not isinstance(raw, int) or isinstance(raw, bool) else int(raw))
        except ValueError:
            raise _invalid(f"{raw!r} is not a {enum_type.__name__}") from None

    def encode(value: Any) -> Any:
        return base.encode((value if type(value) is enum_type else enum_type(value)).value)

    base_write = base.write
    if base_write is None:
        return Kind(enum_type.__name__, decode, encode)

    def write(value: Any, buffer: bytearray) -> None:
        base_write((value if type(value) is enum_type else enum_type(value)).value, buffer)

    return Kind(enum_type.__name__, decode, encode, write)


def _fields_map(value: Any) -> dict[Symbol, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise _invalid("expected a map with symbol keys")
    return {Symbol(k) if isinstance(k, Symbol) else _symbol(k): v for k, v in value.items()}


def _symbol(value: Any) -> Symbol:
    if not isinstance(value, str) or not value.isascii():
        raise _invalid(f"expected a symbol, got {type(value).__name__}")
    return Symbol(value)


def _symbols(value: Any) -> tuple[Symbol, ...]:
    """A ``multiple`` symbol field: one symbol, or an array (or list) of them."""
    if isinstance(value, Array):
        items: Any = value.items
    elif isinstance(value, list):
        items = value
    else:
        items = (value,)
    return tuple(_symbol(item) for item in items)


def _composite_of(*types: type[Composite]) -> Kind:
    def decode(value: Any) -> Any:
        if not isinstance(value, Described):
            raise _invalid(f"expected {' or '.join(t.__name__ for t in types)}, got {type(value).__name__}")
        composite = decode_composite(value)
        if not isinstance(composite, types):
            raise _invalid(
                f"expected {' or '.join(t.__name__ for t in types)}, got {type(composite).__name__}"
            )
        return composite

    def encode(value: Any) -> Any:
        return _described(value)

    return Kind("/".join(t.__name__ for t in types), decode, encode, write_composite)


def _any_composite(value: Any) -> Any:
    """Decode a described value we know; keep one we do not (a transactional target...)."""
    if isinstance(value, Described) and _lookup(value.descriptor) is not None:
        return decode_composite(value)
    return value


def _any_encode(value: Any) -> Any:
    return _described(value) if isinstance(value, Composite) else value


BOOLEAN = _typed("boolean", bool)
UBYTE = _unsigned(UByte)
USHORT = _unsigned(UShort)
UINT = _unsigned(UInt)
ULONG = _unsigned(ULong)
STRING = _typed("string", str, str)
SYMBOL = Kind("symbol", _symbol, _symbol)
SYMBOLS = Kind("symbol[]", _symbols, lambda v: symbol_array(v))
BINARY = _typed("binary", bytes)
TIMESTAMP = _typed("timestamp", Timestamp)
FIELDS = Kind("fields", _fields_map, lambda v: {Symbol(k): _any_encode(x) for k, x in v.items()})
MAP = _typed("map", dict)
ANY = Kind("*", _any_composite, _any_encode, encode_value)  # a composite is its own encoder
ROLE = _enum_kind(Role, BOOLEAN)
SND_SETTLE_MODE = _enum_kind(SndSettleMode, UBYTE)
RCV_SETTLE_MODE = _enum_kind(RcvSettleMode, UBYTE)
SASL_CODE = _enum_kind(SaslCode, UBYTE)


def amqp_field(kind: Kind, default: Any = None, *, mandatory: bool = False) -> Any:
    """A dataclass field with its AMQP type. Mandatory fields have no default."""
    metadata = {"amqp": kind, "mandatory": mandatory}
    if mandatory:
        return dataclasses.field(metadata=metadata)
    if isinstance(default, dict | tuple) and default:
        raise AssertionError("mutable defaults are not supported")  # pragma: no cover
    return dataclasses.field(default=default, metadata=metadata)


# --- composites --------------------------------------------------------------------------------

COMPOSITES: dict[int | str, type[Composite]] = {}


@dataclass(frozen=True, kw_only=True)
class Composite:
    """A described list: ``descriptor_code`` (domain 0x00000000) and ``descriptor_name``."""

    descriptor_code: ClassVar[int] = -1
    descriptor_name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.descriptor_code >= 0:
            if cls.descriptor_code in COMPOSITES:
                raise AssertionError(f"{cls.descriptor_code:#x} registered twice")  # pragma: no cover
            COMPOSITES[cls.descriptor_code] = cls
            COMPOSITES[cls.descriptor_name] = cls
            register_encoder(cls, write_composite)


def _lookup(descriptor: Any) -> type[Composite] | None:
    if isinstance(descriptor, ULong):
        return COMPOSITES.get(int(descriptor))
    if isinstance(descriptor, Symbol):
        return COMPOSITES.get(str(descriptor))
    return None


def _described(value: Composite) -> Composite:
    """A composite as a field value: :func:`encode_value` encodes it (see :func:`write_composite`)."""
    return value


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    kind: Kind
    mandatory: bool
    default: Any
    write: Callable[[Any, bytearray], None]


def _writer(kind: Kind) -> Callable[[Any, bytearray], None]:
    if kind.write is not None:
        return kind.write
    encode = kind.encode
    return lambda value, buffer: encode_value(encode(value), buffer)


@dataclass(frozen=True, slots=True)
class _Layout:
    """A composite class's fields in wire order and its descriptor (made once per class)."""

    fields: tuple[_Field, ...]
    descriptor: ULong
    #: the descriptor's encoding, constructor included
    prefix: bytes
    #: the optional fields' defaults, by name
    defaults: dict[str, Any]
    #: ``write(value, buffer)``: what :func:`write_composite` appends (:mod:`.codegen`)
    write: Callable[[Any, bytearray], None]
    #: ``read(items)``: the composite of a described list's items (:mod:`.codegen`)
    read: Callable[[list[Any]], Any]
    #: ``read_at(buf, pos, end, depth)``: the composite straight from the list's bytes (:mod:`.codegen`)
    read_at: Callable[[bytes, int, int, int], tuple[Any, int]]


#: The byte reader of each composite whose layout is made, by descriptor code: for the fields
#: that may hold a composite (``*``), read without a described value between.
_READERS_AT: dict[int, Callable[[bytes, int, int, int], tuple[Any, int]]] = {}


_LAYOUTS: dict[type[Composite], _Layout] = {}


def _layout(cls: type[Composite]) -> _Layout:
    layout = _LAYOUTS.get(cls)
    if layout is None:
        fields = tuple(
            _Field(
                f.name, f.metadata["amqp"], f.metadata["mandatory"], f.default, _writer(f.metadata["amqp"])
            )
            for f in dataclasses.fields(cls)
        )
        prefix = bytearray((TypeCode.DESCRIBED,))
        encode_value(ULong(cls.descriptor_code), prefix)
        defaults = {f.name: f.default for f in fields if not f.mandatory}
        specs = [
            FieldSpec(f.name, f.mandatory, f.default, f.write, f.kind.decode, f.kind is ANY) for f in fields
        ]
        layout = _LAYOUTS[cls] = _Layout(
            fields,
            ULong(cls.descriptor_code),
            bytes(prefix),
            defaults,
            make_writer(bytes(prefix), specs),
            make_reader(cls, specs, _from_items_checked),
            make_reader_at(cls, specs, WIRE, _READERS_AT),
        )
        _READERS_AT[cls.descriptor_code] = layout.read_at
    return layout


def write_composite(value: Composite, buffer: bytearray) -> None:
    """Append ``value``'s encoding: the bytes ``encode_value(encode_composite(value), buffer)``
    appends, without building the described list first (the frames' path)."""
    layout = _LAYOUTS.get(type(value)) or _layout(type(value))
    layout.write(value, buffer)


def encode_composite(value: Composite) -> Described:
    """The described list of ``value`` (defaults as null, trailing nulls dropped)."""
    layout = _layout(type(value))
    fields, descriptor = layout.fields, layout.descriptor
    items: list[Any] = []
    for f in fields:
        current = getattr(value, f.name)
        if current is None or (not f.mandatory and current == f.default):
            items.append(None)
        else:
            items.append(f.kind.encode(current))
    while items and items[-1] is None:
        items.pop()
    return Described(descriptor, items)


def decode_composite(value: Described) -> Composite:
    """The composite a described list stands for.

    :raises AmqpProtocolError: unknown descriptor, not a list, a missing mandatory field or a
        field of the wrong type (``amqp:decode-error``).
    """
    cls = _lookup(value.descriptor)
    if cls is None:
        raise _invalid(f"Unknown descriptor {value.descriptor!r}.")
    items = value.value
    if not isinstance(items, list):
        raise _invalid(f"A {cls.__name__} must be a list, not {type(items).__name__}.")
    return _from_items(cls, items)


def decode_composite_at(buf: bytes, pos: int, end: int) -> tuple[Any, int]:
    """The value at ``buf[pos]`` (no further than ``end``), which must be a composite; and the
    position after it. The common form (a small-ulong descriptor and a list) is decoded into
    the composite without the described list between them; any other goes through
    :func:`decode_composite`.

    :raises InsufficientData: the value runs past ``end``.
    :raises AmqpProtocolError: as :func:`decode_composite`, or the value is not described.
    """
    if end - pos > 3 and buf[pos] == 0 and buf[pos + 1] == 0x53:
        cls = COMPOSITES.get(buf[pos + 2])
        if cls is not None:
            layout = _LAYOUTS.get(cls) or _layout(cls)
            try:
                return layout.read_at(buf, pos + 3, end, 2)
            except (Unrecognised, AmqpProtocolError, InsufficientData, IndexError, struct.error):
                pass  # not the common form, or malformed: the generic path accepts it or says why
            found = list_at(buf, pos + 3, end, 1)
            if found is not None:
                items, pos = found
                return _from_items(cls, items), pos
    value, pos = decode_at(buf, pos, end)
    if not isinstance(value, Described):
        raise _invalid(f"Expected a performative or composite, not a {type(value).__name__}.")
    return decode_composite(value), pos


def _from_items(cls: type[Composite], items: list[Any]) -> Composite:
    layout = _LAYOUTS.get(cls) or _layout(cls)
    return layout.read(items)  # type: ignore[no-any-return]


def _from_items_checked(cls: type[Composite], items: list[Any]) -> Composite:
    """:func:`_from_items` field by field: the error names the field that is wrong."""
    layout = _layout(cls)
    values = dict(layout.defaults)
    count = len(items)
    for index, f in enumerate(layout.fields):
        raw = items[index] if index < count else None
        if raw is None:
            if f.mandatory:
                raise _invalid(f"{cls.__name__}.{f.name} is mandatory.")
            continue
        try:
            values[f.name] = f.kind.decode(raw)
        except AmqpProtocolError as exc:
            raise _invalid(f"{cls.__name__}.{f.name}: {exc}") from None
    # What the frozen dataclass's __init__ does (composites have no __post_init__), in one
    # update instead of one object.__setattr__ per field.
    composite = object.__new__(cls)
    composite.__dict__.update(values)
    return composite


# --- error, delivery states, terminus ----------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Error(Composite):
    descriptor_code = 0x1D
    descriptor_name = "amqp:error:list"
    condition: Symbol = amqp_field(SYMBOL, mandatory=True)
    description: str | None = amqp_field(STRING)
    info: dict[Symbol, Any] | None = amqp_field(FIELDS)


ERROR = _composite_of(Error)


@dataclass(frozen=True, kw_only=True)
class DeliveryState(Composite):
    """Base of the delivery states and outcomes."""


@dataclass(frozen=True, kw_only=True)
class Received(DeliveryState):
    descriptor_code = 0x23
    descriptor_name = "amqp:received:list"
    section_number: int = amqp_field(UINT, mandatory=True)
    section_offset: int = amqp_field(ULONG, mandatory=True)


@dataclass(frozen=True, kw_only=True)
class Accepted(DeliveryState):
    descriptor_code = 0x24
    descriptor_name = "amqp:accepted:list"


@dataclass(frozen=True, kw_only=True)
class Rejected(DeliveryState):
    descriptor_code = 0x25
    descriptor_name = "amqp:rejected:list"
    error: Error | None = amqp_field(ERROR)


@dataclass(frozen=True, kw_only=True)
class Released(DeliveryState):
    descriptor_code = 0x26
    descriptor_name = "amqp:released:list"


@dataclass(frozen=True, kw_only=True)
class Modified(DeliveryState):
    descriptor_code = 0x27
    descriptor_name = "amqp:modified:list"
    delivery_failed: bool | None = amqp_field(BOOLEAN)
    undeliverable_here: bool | None = amqp_field(BOOLEAN)
    message_annotations: dict[Symbol, Any] | None = amqp_field(FIELDS)


DELIVERY_STATE = _composite_of(DeliveryState)


@dataclass(frozen=True, kw_only=True)
class Source(Composite):
    descriptor_code = 0x28
    descriptor_name = "amqp:source:list"
    address: str | None = amqp_field(ANY)
    durable: int = amqp_field(UINT, 0)
    expiry_policy: Symbol | None = amqp_field(SYMBOL)
    timeout: int = amqp_field(UINT, 0)
    dynamic: bool = amqp_field(BOOLEAN, False)
    dynamic_node_properties: dict[Symbol, Any] | None = amqp_field(FIELDS)
    distribution_mode: Symbol | None = amqp_field(SYMBOL)
    filter: dict[Any, Any] | None = amqp_field(MAP)
    default_outcome: Any = amqp_field(ANY)
    outcomes: tuple[Symbol, ...] | None = amqp_field(SYMBOLS)
    capabilities: tuple[Symbol, ...] | None = amqp_field(SYMBOLS)


@dataclass(frozen=True, kw_only=True)
class Target(Composite):
    descriptor_code = 0x29
    descriptor_name = "amqp:target:list"
    address: str | None = amqp_field(ANY)
    durable: int = amqp_field(UINT, 0)
    expiry_policy: Symbol | None = amqp_field(SYMBOL)
    timeout: int = amqp_field(UINT, 0)
    dynamic: bool = amqp_field(BOOLEAN, False)
    dynamic_node_properties: dict[Symbol, Any] | None = amqp_field(FIELDS)
    capabilities: tuple[Symbol, ...] | None = amqp_field(SYMBOLS)


# --- performatives -----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Performative(Composite):
    """A frame body's leading composite. ``sasl`` says which frame type carries it."""

    sasl: ClassVar[bool] = False


@dataclass(frozen=True, kw_only=True)
class Open(Performative):
    descriptor_code = 0x10
    descriptor_name = "amqp:open:list"
    container_id: str = amqp_field(STRING, mandatory=True)
    hostname: str | None = amqp_field(STRING)
    max_frame_size: int = amqp_field(UINT, 0xFFFF_FFFF)
    channel_max: int = amqp_field(USHORT, 0xFFFF)
    idle_time_out: int | None = amqp_field(UINT)  # milliseconds
    outgoing_locales: tuple[Symbol, ...] | None = amqp_field(SYMBOLS)
    incoming_locales: tuple[Symbol, ...] | None = amqp_field(SYMBOLS)
    offered_capabilities: tuple[Symbol, ...] | None = amqp_field(SYMBOLS)
    desired_capabilities: tuple[Symbol, ...] | None = amqp_field(SYMBOLS)
    properties: dict[Symbol, Any] | None = amqp_field(FIELDS)


@dataclass(frozen=True, kw_only=True)
class Begin(Performative):
    descriptor_code = 0x11
    descriptor_name = "amqp:begin:list"
    remote_channel: int | None = amqp_field(USHORT)
    next_outgoing_id: int = amqp_field(UINT, mandatory=True)
    incoming_window: int = amqp_field(UINT, mandatory=True)
    outgoing_window: int = amqp_field(UINT, mandatory=True)
    handle_max: int = amqp_field(UINT, 0xFFFF_FFFF)
    offered_capabilities: tuple[Symbol, ...] | None = amqp_field(SYMBOLS)
    desired_capabilities: tuple[Symbol, ...] | None = amqp_field(SYMBOLS)
    properties: dict[Symbol, Any] | None = amqp_field(FIELDS)


@dataclass(frozen=True, kw_only=True)
class Attach(Performative):
    descriptor_code = 0x12
    descriptor_name = "amqp:attach:list"
    name: str = amqp_field(STRING, mandatory=True)
    handle: int = amqp_field(UINT, mandatory=True)
    role: Role = amqp_field(ROLE, mandatory=True)
    snd_settle_mode: SndSettleMode = amqp_field(SND_SETTLE_MODE, SndSettleMode.MIXED)
    rcv_settle_mode: RcvSettleMode = amqp_field(RCV_SETTLE_MODE, RcvSettleMode.FIRST)
    source: Source | None = amqp_field(ANY)
    target: Target | None = amqp_field(ANY)
    unsettled: dict[Any, Any] | None = amqp_field(MAP)
    incomplete_unsettled: bool = amqp_field(BOOLEAN, False)
    initial_delivery_count: int | None = amqp_field(UINT)
    max_message_size: int | None = amqp_field(ULONG)
    offered_capabilities: tuple[Symbol, ...] | None = amqp_field(SYMBOLS)
    desired_capabilities: tuple[Symbol, ...] | None = amqp_field(SYMBOLS)
    properties: dict[Symbol, Any] | None = amqp_field(FIELDS)


@dataclass(frozen=True, kw_only=True)
class Flow(Performative):
    descriptor_code = 0x13
    descriptor_name = "amqp:flow:list"
    next_incoming_id: int | None = amqp_field(UINT)
    incoming_window: int = amqp_field(UINT, mandatory=True)
    next_outgoing_id: int = amqp_field(UINT, mandatory=True)
    outgoing_window: int = amqp_field(UINT, mandatory=True)
    handle: int | None = amqp_field(UINT)
    delivery_count: int | None = amqp_field(UINT)
    link_credit: int | None = amqp_field(UINT)
    available: int | None = amqp_field(UINT)
    drain: bool = amqp_field(BOOLEAN, False)
    echo: bool = amqp_field(BOOLEAN, False)
    properties: dict[Symbol, Any] | None = amqp_field(FIELDS)


@dataclass(frozen=True, kw_only=True)
class Transfer(Performative):
    descriptor_code = 0x14
    descriptor_name = "amqp:transfer:list"
    handle: int = amqp_field(UINT, mandatory=True)
    delivery_id: int | None = amqp_field(UINT)
    delivery_tag: bytes | None = amqp_field(BINARY)
    message_format: int | None = amqp_field(UINT)
    settled: bool | None = amqp_field(BOOLEAN)
    more: bool = amqp_field(BOOLEAN, False)
    rcv_settle_mode: RcvSettleMode | None = amqp_field(RCV_SETTLE_MODE)
    state: DeliveryState | None = amqp_field(DELIVERY_STATE)
    resume: bool = amqp_field(BOOLEAN, False)
    aborted: bool = amqp_field(BOOLEAN, False)
    batchable: bool = amqp_field(BOOLEAN, False)


@dataclass(frozen=True, kw_only=True)
class Disposition(Performative):
    descriptor_code = 0x15
    descriptor_name = "amqp:disposition:list"
    role: Role = amqp_field(ROLE, mandatory=True)
    first: int = amqp_field(UINT, mandatory=True)
    last: int | None = amqp_field(UINT)
    settled: bool = amqp_field(BOOLEAN, False)
    state: DeliveryState | None = amqp_field(DELIVERY_STATE)
    batchable: bool = amqp_field(BOOLEAN, False)


@dataclass(frozen=True, kw_only=True)
class Detach(Performative):
    descriptor_code = 0x16
    descriptor_name = "amqp:detach:list"
    handle: int = amqp_field(UINT, mandatory=True)
    closed: bool = amqp_field(BOOLEAN, False)
    error: Error | None = amqp_field(ERROR)


@dataclass(frozen=True, kw_only=True)
class End(Performative):
    descriptor_code = 0x17
    descriptor_name = "amqp:end:list"
    error: Error | None = amqp_field(ERROR)


@dataclass(frozen=True, kw_only=True)
class Close(Performative):
    descriptor_code = 0x18
    descriptor_name = "amqp:close:list"
    error: Error | None = amqp_field(ERROR)


# --- SASL (Part 5 §5.3.3) ----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SaslMechanisms(Performative):
    sasl = True
    descriptor_code = 0x40
    descriptor_name = "amqp:sasl-mechanisms:list"
    sasl_server_mechanisms: tuple[Symbol, ...] = amqp_field(SYMBOLS, mandatory=True)


@dataclass(frozen=True, kw_only=True)
class SaslInit(Performative):
    sasl = True
    descriptor_code = 0x41
    descriptor_name = "amqp:sasl-init:list"
    mechanism: Symbol = amqp_field(SYMBOL, mandatory=True)
    initial_response: bytes | None = amqp_field(BINARY)
    hostname: str | None = amqp_field(STRING)


@dataclass(frozen=True, kw_only=True)
class SaslChallenge(Performative):
    sasl = True
    descriptor_code = 0x42
    descriptor_name = "amqp:sasl-challenge:list"
    challenge: bytes = amqp_field(BINARY, mandatory=True)


@dataclass(frozen=True, kw_only=True)
class SaslResponse(Performative):
    sasl = True
    descriptor_code = 0x43
    descriptor_name = "amqp:sasl-response:list"
    response: bytes = amqp_field(BINARY, mandatory=True)


@dataclass(frozen=True, kw_only=True)
class SaslOutcome(Performative):
    sasl = True
    descriptor_code = 0x44
    descriptor_name = "amqp:sasl-outcome:list"
    code: SaslCode = amqp_field(SASL_CODE, mandatory=True)
    additional_data: bytes | None = amqp_field(BINARY)


# --- message sections: in .message, named here too (where the layers import them from) --------

from .message import (  # noqa: E402 - .message builds on the composites above
    AmqpSequence,
    AmqpValue,
    ApplicationProperties,
    Data,
    DeliveryAnnotations,
    Footer,
    Header,
    Message,
    MessageAnnotations,
    Properties,
    decode_message,
    encode_message,
)
