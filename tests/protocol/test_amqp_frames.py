"""AMQP 1.0 frames, performatives and message sections: exact bytes, round trips, every
truncation, malformed input, and a bounded fuzz of the frame decoder."""

from __future__ import annotations

import random
import uuid
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from provisiond.errors import AmqpProtocolError, InsufficientData, LocalProtocolError
from provisiond.protocol.amqp import frames as frames_module
from provisiond.protocol.amqp import message as message_module
from provisiond.protocol.amqp import performatives as performatives_module
from provisiond.protocol.amqp.decoding import list_at
from provisiond.protocol.amqp.frames import (
    SHARED_FRAME_SIZE,
    Frame,
    FrameType,
    ProtocolHeader,
    ProtocolId,
    decode_frame,
    decode_protocol_header,
    encode_frame,
)
from provisiond.protocol.amqp.performatives import (
    Accepted,
    AmqpSequence,
    AmqpValue,
    Attach,
    Begin,
    Close,
    Data,
    Detach,
    Disposition,
    End,
    Error,
    Flow,
    Header,
    Message,
    Modified,
    Open,
    Properties,
    RcvSettleMode,
    Received,
    Rejected,
    Released,
    Role,
    SaslChallenge,
    SaslCode,
    SaslInit,
    SaslMechanisms,
    SaslOutcome,
    SaslResponse,
    SndSettleMode,
    Source,
    Target,
    Transfer,
    decode_composite_at,
    decode_message,
    encode_composite,
    encode_message,
    write_composite,
)
from provisiond.protocol.amqp.types import Described, Symbol, Timestamp, UInt, ULong, encode_value

BIG = 1 << 20


def frame_bytes(frame: Frame) -> bytes:
    buffer = bytearray()
    encode_frame(frame, buffer)
    return bytes(buffer)


# --- protocol headers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("protocol", "wire"),
    [(ProtocolId.AMQP, b"AMQP\x00\x01\x00\x00"), (ProtocolId.SASL, b"AMQP\x03\x01\x00\x00")],
    ids=["amqp", "sasl"],
)
def test_protocol_headers(protocol: ProtocolId, wire: bytes) -> None:
    assert ProtocolHeader(protocol).encode() == wire
    rest, header = decode_protocol_header(wire + b"x")
    assert header == ProtocolHeader(protocol) and bytes(rest) == b"x"
    for length in range(len(wire)):
        with pytest.raises(InsufficientData):
            decode_protocol_header(wire[:length])


@pytest.mark.parametrize(
    "wire", [b"GET / HTTP/1.1\r\n", b"AMQX\x00\x01\x00\x00", b"AMQP\x07\x01\x00\x00", b"\x16\x03"]
)
def test_not_a_protocol_header(wire: bytes) -> None:
    with pytest.raises(AmqpProtocolError) as info:
        decode_protocol_header(wire)
    assert info.value.condition == "amqp:connection:framing-error"


# --- frames ------------------------------------------------------------------------------------

ERROR = Error(condition=Symbol("amqp:not-found"), description="no such node", info={Symbol("retry-after"): 3})

FRAMES = [
    pytest.param(Frame(FrameType.AMQP, 0, None), id="empty"),
    pytest.param(
        Frame(
            FrameType.AMQP,
            0,
            Open(
                container_id="c1",
                hostname="localhost",
                max_frame_size=65536,
                channel_max=7,
                idle_time_out=60000,
                offered_capabilities=(Symbol("x"),),
                properties={Symbol("com.microsoft:client-version"): "ua/1"},
            ),
        ),
        id="open",
    ),
    pytest.param(
        Frame(
            FrameType.AMQP,
            3,
            Begin(remote_channel=2, next_outgoing_id=1, incoming_window=100, outgoing_window=5),
        ),
        id="begin",
    ),
    pytest.param(
        Frame(
            FrameType.AMQP,
            1,
            Attach(
                name="sender_link",
                handle=0,
                role=Role.SENDER,
                snd_settle_mode=SndSettleMode.UNSETTLED,
                rcv_settle_mode=RcvSettleMode.SECOND,
                source=Source(address="local", outcomes=(Symbol("amqp:accepted:list"),)),
                target=Target(address="0ne00000001/registrations/dev-1"),
                initial_delivery_count=0,
                max_message_size=65536,
                properties={Symbol("com.microsoft:api-version"): "2019-03-31"},
            ),
        ),
        id="attach",
    ),
    pytest.param(
        Frame(
            FrameType.AMQP,
            0,
            Flow(
                next_incoming_id=0,
                incoming_window=2048,
                next_outgoing_id=1,
                outgoing_window=2048,
                handle=1,
                delivery_count=0,
                link_credit=10,
                drain=True,
            ),
        ),
        id="flow",
    ),
    pytest.param(
        Frame(
            FrameType.AMQP,
            0,
            Transfer(
                handle=0, delivery_id=5, delivery_tag=b"\x00\x01", message_format=0, settled=False, more=True
            ),
            b"payload",
        ),
        id="transfer",
    ),
    pytest.param(
        Frame(FrameType.AMQP, 0, Transfer(handle=0, state=Received(section_number=1, section_offset=7))),
        id="transfer-state",
    ),
    pytest.param(
        Frame(
            FrameType.AMQP,
            0,
            Disposition(role=Role.RECEIVER, first=1, last=3, settled=True, state=Accepted()),
        ),
        id="disposition-accepted",
    ),
    pytest.param(
        Frame(FrameType.AMQP, 0, Disposition(role=Role.RECEIVER, first=1, state=Rejected(error=ERROR))),
        id="disposition-rejected",
    ),
    pytest.param(
        Frame(FrameType.AMQP, 0, Disposition(role=Role.SENDER, first=2, state=Released())),
        id="disposition-released",
    ),
    pytest.param(
        Frame(
            FrameType.AMQP, 0, Disposition(role=Role.SENDER, first=2, state=Modified(delivery_failed=True))
        ),
        id="disposition-modified",
    ),
    pytest.param(Frame(FrameType.AMQP, 0, Detach(handle=1, closed=True, error=ERROR)), id="detach"),
    pytest.param(Frame(FrameType.AMQP, 0, End()), id="end"),
    pytest.param(Frame(FrameType.AMQP, 0, Close(error=ERROR)), id="close"),
    pytest.param(
        Frame(FrameType.SASL, 0, SaslMechanisms(sasl_server_mechanisms=(Symbol("TPM"), Symbol("PLAIN")))),
        id="sasl-mechanisms",
    ),
    pytest.param(
        Frame(
            FrameType.SASL,
            0,
            SaslInit(mechanism=Symbol("PLAIN"), initial_response=b"\x00user\x00pass", hostname="h"),
        ),
        id="sasl-init",
    ),
    pytest.param(Frame(FrameType.SASL, 0, SaslChallenge(challenge=b"\x00")), id="sasl-challenge"),
    pytest.param(Frame(FrameType.SASL, 0, SaslResponse(response=b"\x00srk")), id="sasl-response"),
    pytest.param(
        Frame(FrameType.SASL, 0, SaslOutcome(code=SaslCode.AUTH, additional_data=b"why")), id="sasl-outcome"
    ),
]


@pytest.mark.parametrize("frame", FRAMES)
def test_frame_round_trip_and_every_truncation(frame: Frame) -> None:
    data = frame_bytes(frame)
    rest, decoded = decode_frame(data + b"\x00", BIG)
    assert decoded == frame and bytes(rest) == b"\x00"
    for length in range(len(data)):
        with pytest.raises(InsufficientData):
            decode_frame(data[:length], BIG)


@pytest.mark.parametrize("frame", [f for f in FRAMES if f.values[0].performative is not None])
def test_each_composite_writer_writes_the_generic_described_list(frame: Frame) -> None:
    """The writer made for each class (codegen.py) agrees with the described list the generic
    encode_composite makes, byte for byte."""
    performative = frame.performative
    assert performative is not None
    expected = bytearray()
    encode_value(encode_composite(performative), expected)
    written = bytearray()
    write_composite(performative, written)
    assert bytes(written) == bytes(expected)


@pytest.mark.parametrize("frame", [f for f in FRAMES if f.values[0].performative is not None])
def test_each_composite_byte_reader_reads_what_the_generic_path_reads(frame: Frame) -> None:
    """The byte reader made for each class (codegen.py) reads the common encoding by itself (no
    fallback) and makes the composite the generic path makes from the list's items."""
    performative = frame.performative
    assert performative is not None
    body = bytearray()
    write_composite(performative, body)
    data = bytes(body)
    by_bytes, end = performatives_module._layout(type(performative)).read_at(data, 3, len(data), 2)
    items = list_at(data, 3, len(data), 1)
    assert items is not None
    assert end == len(data) and by_bytes == performative == decode_composite_at(data, 0, len(data))[0]
    assert vars(by_bytes) == vars(performatives_module._from_items(type(performative), items[0]))


@pytest.mark.parametrize(
    "body",
    [
        # attach("l", handle 1 as a smallulong (widened), role true, two nulls, a source as a
        # list32, a target described by its symbolic name)
        "005312c03007a1016c5301414040005328d00000000800000002a101614000a310616d71703a746172676574"
        "3a6c697374c0020140",
        # attach("l", 1, true) as a list32, twelve nulls, and an element past the last field
        "005312d0000000180000000fa1016c5201414040404040404040404040a1017a",
    ],
    ids=["widened-and-named", "list32-extra-element"],
)
def test_unusual_encodings_read_the_same_by_bytes_or_generically(body: str) -> None:
    """What the byte reader does not handle goes to the generic path, and what it handles
    reads the same as the generic path would: one answer either way."""
    data = bytes.fromhex(body)
    decoded, end = decode_composite_at(data, 0, len(data))
    items = list_at(data, 3, len(data), 1)
    assert items is not None and end == len(data)
    assert decoded == performatives_module._from_items(Attach, items[0])
    assert isinstance(decoded, Attach) and decoded.name == "l" and decoded.handle == 1
    assert type(decoded.handle) is UInt and decoded.role is Role.RECEIVER


def test_composites_nested_too_deep_are_a_decode_error() -> None:
    """Sources nested in each other's default-outcome, 2,000 deep, in one attach: the decode
    error for nesting, as the generic path says it, not a RecursionError from the byte readers."""
    plain = Attach(name="l", handle=0, role=Role.SENDER, source=Source(address="a"), target=Target())
    body = bytearray()
    write_composite(plain, body)
    assert decode_composite_at(bytes(body), 0, len(body))[0] == plain  # the source's byte reader is made
    inner = bytes.fromhex("00532845")  # source: an empty list
    for _ in range(2000):
        elements = b"\x40" * 8 + inner  # eight nulls, then default-outcome
        inner = (
            bytes.fromhex("005328d0")
            + (4 + len(elements)).to_bytes(4, "big")
            + b"\x00\x00\x00\x09"
            + elements
        )
    elements = bytes.fromhex("a1016c5201414040") + inner  # name, handle, role, two nulls, source
    body = bytes.fromhex("005312d0") + (4 + len(elements)).to_bytes(4, "big") + b"\x00\x00\x00\x06" + elements
    with pytest.raises(AmqpProtocolError, match="nested deeper than") as info:
        decode_composite_at(body, 0, len(body))
    assert info.value.condition == "amqp:decode-error"


def test_a_field_of_the_wrong_type_is_named_in_the_error() -> None:
    # attach(name "l", handle "x" (a string where a uint goes), role true)
    body = bytes.fromhex("005312c00803a1016ca1017841")
    data = (8 + len(body)).to_bytes(4, "big") + bytes.fromhex("02000000") + body
    with pytest.raises(AmqpProtocolError, match=r"Attach\.handle: expected uint") as info:
        decode_frame(data, BIG)
    assert info.value.condition == "amqp:decode-error"


def test_frames_met_before_are_shared_only_when_immutable() -> None:
    plain = frame_bytes(
        Frame(FrameType.AMQP, 0, Flow(incoming_window=9, next_outgoing_id=0, outgoing_window=9))
    )
    assert decode_frame(plain, BIG)[1] == decode_frame(plain, BIG)[1]
    # A flow whose properties (a map) the application could change is decoded anew each time.
    mapped = Flow(incoming_window=9, next_outgoing_id=0, outgoing_window=9, properties={Symbol("k"): "v"})
    data = frame_bytes(Frame(FrameType.AMQP, 0, mapped))
    assert len(data) <= SHARED_FRAME_SIZE
    first = decode_frame(data, BIG)[1].performative
    assert isinstance(first, Flow) and first.properties is not None
    first.properties[Symbol("k")] = "changed"
    again = decode_frame(data, BIG)[1].performative
    assert isinstance(again, Flow) and again.properties == {Symbol("k"): "v"}
    # Encoding one never changes what an equal frame encodes to.
    assert frame_bytes(Frame(FrameType.AMQP, 0, mapped)) == data


def test_the_tables_of_shared_frames_stay_bounded() -> None:
    for credit in range(3 * frames_module._SHARED_ENTRIES):
        flow = Flow(incoming_window=9, next_outgoing_id=0, outgoing_window=9, handle=0, link_credit=credit)
        data = frame_bytes(Frame(FrameType.AMQP, 0, flow))
        assert decode_frame(data, BIG)[1].performative == flow
    assert len(frames_module._DECODED) <= frames_module._SHARED_ENTRIES
    assert len(frames_module._ENCODED) <= frames_module._SHARED_ENTRIES


def test_exact_empty_frame_and_open() -> None:
    assert frame_bytes(Frame(FrameType.AMQP, 0, None)).hex() == "0000000802000000"
    # open(container-id "c"): described 0x10, list8 of one str8.
    assert (
        frame_bytes(Frame(FrameType.AMQP, 0, Open(container_id="c"))).hex()
        == "0000001102000000" + "005310c00401a10163"
    )


def test_defaults_are_sent_as_null_and_read_back() -> None:
    frame = Frame(
        FrameType.AMQP, 0, Attach(name="l", handle=0, role=Role.RECEIVER, snd_settle_mode=SndSettleMode.MIXED)
    )
    data = frame_bytes(frame)
    assert data.endswith(bytes.fromhex("c00603a1016c4341"))  # name, handle uint0, role true; nothing else
    assert decode_frame(data, BIG)[1].performative == frame.performative


def test_extended_header_is_skipped_and_sasl_channel_ignored() -> None:
    body = frame_bytes(Frame(FrameType.SASL, 0, SaslChallenge(challenge=b"x")))[8:]
    data = (12 + len(body)).to_bytes(4, "big") + bytes((3, 1)) + b"\x00\x07" + b"ext!" + body
    _, frame = decode_frame(data, BIG)
    assert frame == Frame(FrameType.SASL, 0, SaslChallenge(challenge=b"x"))


def test_symbolic_descriptors_decode() -> None:
    buffer = bytearray()
    encode_value(Described(Symbol("amqp:end:list"), []), buffer)
    data = (8 + len(buffer)).to_bytes(4, "big") + b"\x02\x00\x00\x00" + buffer
    assert decode_frame(data, BIG)[1].performative == End()


def test_a_multiple_field_may_be_a_single_symbol() -> None:
    buffer = bytearray()
    encode_value(Described(ULong(0x40), [Symbol("PLAIN")]), buffer)
    data = (8 + len(buffer)).to_bytes(4, "big") + b"\x02\x01\x00\x00" + buffer
    assert decode_frame(data, BIG)[1].performative == SaslMechanisms(
        sasl_server_mechanisms=(Symbol("PLAIN"),)
    )


def _raw_frame(body_values: list[Any], *, type_: int = 0, extra: bytes = b"") -> bytes:
    buffer = bytearray()
    for value in body_values:
        encode_value(value, buffer)
    buffer += extra
    return (8 + len(buffer)).to_bytes(4, "big") + bytes((2, type_)) + b"\x00\x00" + buffer


MALFORMED_FRAMES = [
    pytest.param(bytes.fromhex("0000000702000000"), "framing-error", id="size-below-header"),
    pytest.param(bytes.fromhex("0000000801000000"), "framing-error", id="doff-1"),
    pytest.param(bytes.fromhex("0000000803000000"), "framing-error", id="doff-beyond-size"),
    pytest.param(bytes.fromhex("0000000802050000"), "framing-error", id="unknown-type"),
    pytest.param(bytes.fromhex("0010000002000000"), "framing-error", id="too-large"),
    pytest.param(bytes.fromhex("0000000802010000"), "decode-error", id="empty-sasl"),
    pytest.param(_raw_frame(["text"]), "decode-error", id="not-described"),
    pytest.param(_raw_frame([Described(ULong(0x10), [])]), "decode-error", id="open-missing-container-id"),
    pytest.param(
        _raw_frame([Described(ULong(0x10), [5])]), "decode-error", id="open-container-id-not-string"
    ),
    pytest.param(_raw_frame([Described(ULong(0x99), [])]), "decode-error", id="unknown-descriptor"),
    pytest.param(_raw_frame([Described(ULong(0x24), [])]), "decode-error", id="not-a-performative"),
    pytest.param(
        _raw_frame([Described(ULong(0x41), [Symbol("PLAIN")])]), "decode-error", id="sasl-in-amqp-frame"
    ),
    pytest.param(_raw_frame([Described(ULong(0x17), [])], type_=1), "decode-error", id="amqp-in-sasl-frame"),
    pytest.param(
        _raw_frame([Described(ULong(0x17), [])], extra=b"\x40"), "decode-error", id="payload-after-end"
    ),
    pytest.param(_raw_frame([Described(ULong(0x17), "x")]), "decode-error", id="performative-not-list"),
    pytest.param(_raw_frame([], extra=b"\x00\x53\x10\xc0\x05"), "decode-error", id="truncated-performative"),
    pytest.param(_raw_frame([Described(ULong(0x12), ["l", 0, True])]), "decode-error", id="handle-signed"),
    pytest.param(
        _raw_frame([Described(ULong(0x44), [Described(ULong(0x50), 0)])]),
        "decode-error",
        id="outcome-code-described",
    ),
    pytest.param(
        _raw_frame([Described(ULong(0x15), [True, ULong(2**40)])]), "decode-error", id="uint-too-big"
    ),
]


@pytest.mark.parametrize(("data", "condition"), MALFORMED_FRAMES)
def test_malformed_frames(data: bytes, condition: str) -> None:
    with pytest.raises(AmqpProtocolError) as info:
        decode_frame(data, 4096)
    assert info.value.condition.endswith(condition)


def test_an_oversized_frame_is_refused_from_its_header() -> None:
    with pytest.raises(AmqpProtocolError, match="exceeds"):
        decode_frame(bytes.fromhex("0000100002000000"), 512)


def test_frames_that_cannot_exist() -> None:
    with pytest.raises(LocalProtocolError):
        Frame(FrameType.AMQP, 0, End(), b"payload")
    with pytest.raises(LocalProtocolError):
        Frame(FrameType.AMQP, 0, SaslChallenge(challenge=b""))
    with pytest.raises(LocalProtocolError):
        Frame(FrameType.AMQP, 70000, None)


# --- messages ----------------------------------------------------------------------------------

MESSAGES = [
    pytest.param(Message(), id="empty"),
    pytest.param(
        Message(
            header=Header(durable=True, ttl=1000),
            delivery_annotations={Symbol("x"): 1},
            message_annotations={Symbol("y"): "z"},
            properties=Properties(
                message_id=uuid.UUID(int=5),
                correlation_id="c-1",
                to="amqps://h/0ne/registrations/d",
                content_type=Symbol("application/json"),
                creation_time=Timestamp(1),
                group_sequence=3,
            ),
            application_properties={
                "iotdps-operation-type": "iotdps-register",
                "iotdps-forceRegistration": False,
            },
            body=(Data(b'{"registrationId":"d"}'),),
            footer={Symbol("f"): None},
        ),
        id="register",
    ),
    pytest.param(Message(body=(Data(b"a"), Data(b"b"))), id="two-data-sections"),
    pytest.param(Message(body=AmqpValue("iotdps-get-operationstatus")), id="amqp-value"),
    pytest.param(Message(body=(AmqpSequence([1, 2]), AmqpSequence([]))), id="sequences"),
    pytest.param(
        Message(properties=Properties(message_id=ULong(7), correlation_id=b"\x01")), id="binary-ids"
    ),
]


@pytest.mark.parametrize("message", MESSAGES)
def test_message_round_trip(message: Message) -> None:
    assert decode_message(encode_message(message)) == message


def test_message_data_concatenates_data_sections() -> None:
    assert Message(body=(Data(b"a"), Data(b"b"))).data == b"ab"
    assert Message(body=AmqpValue("x")).data is None
    assert Message().data is None


def _sections(*values: Any) -> bytes:
    buffer = bytearray()
    for value in values:
        encode_value(value, buffer)
    return bytes(buffer)


def _d(code: int, value: Any) -> Described:
    return Described(ULong(code), value)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(_sections(_d(0x75, b"a"), _d(0x70, [])), id="header-after-body"),
        pytest.param(_sections(_d(0x73, []), _d(0x73, [])), id="properties-twice"),
        pytest.param(_sections(_d(0x77, 1), _d(0x77, 2)), id="two-amqp-values"),
        pytest.param(_sections(_d(0x75, b"a"), _d(0x76, [])), id="mixed-body"),
        pytest.param(_sections(_d(0x75, "not binary")), id="data-not-binary"),
        pytest.param(_sections(_d(0x74, [1])), id="application-properties-not-map"),
        pytest.param(_sections(_d(0x24, [])), id="not-a-section"),
        pytest.param(_sections("bare"), id="not-described"),
        pytest.param(_sections(_d(0x75, b"abc"))[:-1], id="truncated"),
        pytest.param(_sections(_d(0x73, [None, "user-id is binary"])), id="properties-field-type"),
    ],
)
def test_malformed_messages(payload: bytes) -> None:
    with pytest.raises(AmqpProtocolError):
        decode_message(payload)


def _outcome(payload: bytes) -> Any:
    try:
        return decode_message(payload)
    except AmqpProtocolError as exc:
        return (type(exc), exc.message, exc.condition)


def test_data_and_application_properties_read_from_their_bytes_are_the_sections_decoded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``decode_message`` reads a data section and application properties from their bytes
    (the second from the ones of the same bytes read before): every message here, every cut of
    it and every byte of it changed decodes to the same message, or the same error, as with
    that read off (the general decoder)."""
    properties = [
        {"iotdps-operation-type": "iotdps-register", "iotdps-forceRegistration": False},
        {"a": "x" * 300},  # map32
        {"nested": {"k": 1}},  # not shared: a map in a map
        {"list": [1, 2]},
        {"id": uuid.UUID(int=3)},
        {},
    ]
    payloads = [
        encode_message(Message(application_properties=props, body=(Data(b"b" * size),)))
        for props in properties
        for size in (0, 1, 255, 256, 70_000)
    ]
    payloads += [encode_message(cast(Message, p.values[0])) for p in MESSAGES]
    variants: list[bytes] = []
    for payload in payloads:
        if len(payload) > 2000:
            variants += [payload, payload[:-1], payload[:7]]
            continue
        variants += [payload[:cut] for cut in range(len(payload))]
        for at in range(len(payload)):
            for value in (0x00, 0xFF, payload[at] ^ 0x01, payload[at] ^ 0x80):
                variants.append(payload[:at] + bytes((value,)) + payload[at + 1 :])
    fast = [_outcome(v) for v in variants] + [_outcome(v) for v in variants]  # made, then found
    monkeypatch.setattr(message_module, "_known_section", lambda buf, pos, end: None)
    general = [_outcome(v) for v in variants]
    assert fast == general + general
    decoded = [f for f in fast if isinstance(f, Message)]
    assert len(decoded) > len(payloads)  # not only errors
    monkeypatch.undo()
    first, again = decode_message(payloads[0]), decode_message(payloads[0])
    assert first.application_properties == again.application_properties
    assert first.application_properties is not again.application_properties  # each its own map


# --- fuzz --------------------------------------------------------------------------------------


def _decode_or_protocol_error(data: bytes, max_frame_size: int = 4096) -> None:
    try:
        rest, frame = decode_frame(data, max_frame_size)
        if isinstance(frame.performative, Transfer) and frame.payload:
            decode_message(frame.payload)
    except (InsufficientData, AmqpProtocolError):
        pass


@given(st.binary(max_size=300))
@settings(max_examples=1500, deadline=None)
def test_arbitrary_bytes_decode_or_raise_the_protocol_error(data: bytes) -> None:
    _decode_or_protocol_error(data)
    _decode_or_protocol_error(b"\x00\x00\x00" + bytes((len(data) + 8) & 0xFF) + b"\x02\x00\x00\x00" + data)


#: Mutated frames the fuzz tries (reported in the issue: keep the number stable).
FUZZ_INPUTS = 20_000


def test_fuzz_mutated_frames(capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(61)
    message = encode_message(cast(Message, MESSAGES[1].values[0]))
    seeds = [frame_bytes(cast(Frame, p.values[0])) for p in FRAMES]
    seeds.append(
        frame_bytes(Frame(FrameType.AMQP, 0, Transfer(handle=0, delivery_id=0, delivery_tag=b"t"), message))
    )
    tried = 0
    for _ in range(FUZZ_INPUTS):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            where = rng.randrange(len(data))
            op = rng.randrange(3)
            if op == 0:
                data[where] ^= 1 << rng.randrange(8)
            elif op == 1:
                data[where] = rng.choice((0x00, 0xFF, 0x40, 0x45, 0xA1, 0xE0, 0xC0, 0x53))
            else:
                del data[where]
        if rng.random() < 0.5:  # keep the size field consistent, so the body gets parsed
            data[0:4] = len(data).to_bytes(4, "big")
        _decode_or_protocol_error(bytes(data))
        tried += 1
    assert tried == FUZZ_INPUTS
    with capsys.disabled():
        print(f"\n[amqp fuzz] frames and messages: {tried} mutated frames tried")  # noqa: T201 (the report line)


def test_templates_make_one_performative_per_values_and_stay_bounded() -> None:
    made: list[tuple[int, Any]] = []

    def make(credit: int, properties: Any = None) -> Flow:
        made.append((credit, properties))
        return Flow(
            incoming_window=9,
            next_outgoing_id=0,
            outgoing_window=9,
            link_credit=credit,
            properties=properties,
        )

    flows = frames_module.Templates(make)
    assert flows(5) is flows(5) and len(made) == 1
    assert flows(6) == Flow(incoming_window=9, next_outgoing_id=0, outgoing_window=9, link_credit=6)
    # Values that cannot be hashed (a map) make a new performative each time, never a shared one.
    mapped = {Symbol("k"): "v"}
    assert flows(7, mapped) is not flows(7, mapped)
    for credit in range(3 * frames_module._SHARED_ENTRIES):
        assert flows(credit).link_credit == credit
    assert len(flows) <= frames_module._SHARED_ENTRIES


def test_symbols_met_before_are_shared_and_their_table_stays_bounded() -> None:
    from provisiond.protocol.amqp import decoding

    def sym8(text: str) -> bytes:
        return bytes((0xA3, len(text))) + text.encode("ascii")

    first = decoding.decode_value(sym8("com.microsoft:api-version"))[1]
    assert type(first) is Symbol and first == "com.microsoft:api-version"
    assert decoding.decode_value(sym8("com.microsoft:api-version"))[1] is first
    long = "x" * (decoding._SHARED_SYMBOL_SIZE + 1)
    assert decoding.decode_value(sym8(long))[1] == long
    assert long.encode() not in decoding._SYMBOLS
    for n in range(3 * decoding._SYMBOL_ENTRIES):
        assert decoding.decode_value(sym8(f"s{n}"))[1] == f"s{n}"
    assert len(decoding._SYMBOLS) <= decoding._SYMBOL_ENTRIES
    with pytest.raises(AmqpProtocolError, match="not ASCII"):
        decoding.decode_value(b"\xa3\x02\xc3\xa9")
